"""A local AWS stack that the project starts and stops itself: moto, a Lambda pool, a router.

The real Lambda handler has to be tested without AWS and without Docker. This module
starts, as background processes bound to 127.0.0.1:

* a moto server (S3, IAM, STS, the Lambda control plane, Step Functions with execution
  enabled);
* a pool of AWS Lambda Runtime Interface Emulator (RIE) processes, one per concurrency
  slot, each running the real runtime client (``python -m awslambdaric <handler>``) with
  its own port, ``/tmp`` and CPU, like one Lambda execution environment each;
* a router, the stack's single ``AWS_ENDPOINT_URL``: Lambda ``Invoke`` requests go to a
  free RIE slot (HTTP 429 ``TooManyRequestsException`` when every slot is busy, as the
  real service answers when concurrency is exhausted), everything else goes to moto.

moto runs with ``MOTO_PORT`` set to the router's port, so the Lambda tasks of its Step
Functions engine reach the RIE pool too. The router also makes the RIE's answers speak
the real service's contract (``X-Amz-Function-Error`` on handler errors and timeouts).

Use it as ``with LocalAws.start(state_dir, handler=...) as aws: ...`` in tests, or from
the shell: ``python -m cai.localaws start|status|env|stop|install-rie``. Production code
needs no change: it reaches the stack through the standard ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from cai.errors import CaiError, ConfigError

logger = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/tmp/cai-aws")
DEFAULT_HANDLER_DIR = Path(__file__).resolve().parents[2] / "lambda"
DEFAULT_REGION = "us-east-1"
RIE_ENV_VAR = "CAI_LAMBDA_RIE"
RIE_NAME = "aws-lambda-rie"
FAKE_KEY = "testing"
LOOPBACK = "127.0.0.1"
STATUS_PATH = "/_cai/status"

MOTO_READY_S = 60.0
ROUTER_READY_S = 60.0
SLOT_READY_S = 20.0
STOP_GRACE_S = 3.0
KILL_WAIT_S = 2.0

_INVOKE_RE = re.compile(r"^/2015-03-31/functions/([^/?]+)/invocations/?$")
_RIE_INVOKE_PATH = "/2015-03-31/functions/function/invocations"
_FORWARDED_INVOKE_HEADERS = (
    "X-Amz-Invocation-Type",
    "X-Amz-Log-Type",
    "X-Amz-Client-Context",
    "Content-Type",
)
# Hop-by-hop headers, and those the router recomputes (it de-chunks and answers 100-continue).
_NOT_FORWARDED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "content-length",
    }
)
_THROTTLE_BODY = json.dumps(
    {
        "Type": "User",
        "Reason": "ReservedFunctionConcurrentInvocationLimitExceeded",
        "message": "Rate Exceeded.",
    }
).encode()
_TIMEOUT_PREFIX = b"Task timed out after"
_STREAM_ABOVE = 1 << 20  # moto answers longer than this are copied through in pieces
_EXCEPTION_LINE = re.compile(r"^[\w.]+(Error|Exception|Exit)\b")

__all__ = [
    "DEFAULT_STATE_DIR",
    "LocalAws",
    "build_parser",
    "create_role",
    "find_rie",
    "install_rie",
    "main",
    "run",
    "serve_router",
]


# --------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, session id, start time in clock ticks) of ``pid``, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[0], int(fields[3]), int(fields[19])


def _alive(pid: int | None, start: int | None = None) -> bool:
    """Whether ``pid`` runs (zombies count as gone) and, if given, started at ``start``."""
    if not pid:
        return False
    stat = _proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    return start is None or stat[2] == start


def _start_time(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[2] if stat else None


def _session_members(sids: set[int]) -> list[int]:
    """Live (non-zombie) pids whose session is one of ``sids``.

    Each component starts in a session of its own; the RIE puts its runtime in another
    process group of that session, so the session, not the group, holds them all.
    """
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(int(entry.name))
        if stat and stat[0] not in ("Z", "X") and stat[1] in sids:
            found.append(int(entry.name))
    return sorted(found)


def _signal_session(sid: int, sig: int) -> None:
    """Send ``sig`` to every process of session ``sid``."""
    for pid in _session_members({sid}):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_sessions_empty(sids: set[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while True:
        left = _session_members(sids)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def _free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago."""
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def _log_says(path: Path) -> str:
    """The log's last error line (an ERROR record or an exception), else its last line."""
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    for line in reversed(lines):
        if " ERROR " in line or _EXCEPTION_LINE.match(line):
            return line.strip()
    return lines[-1].strip() if lines else "(empty log)"


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any AWS_* or MOTO_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
    env.update(extra)
    return env


# ---------------------------------------------------------------------------- the RIE


def _rie_arch() -> str:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return "x86_64"
    if machine in ("aarch64", "arm64"):
        return "arm64"
    raise CaiError(
        f"platform.machine() is {machine!r}; the Lambda RIE exists for x86_64 and arm64 only"
    )


def find_rie() -> Path:
    """Locate the ``aws-lambda-rie`` binary.

    Looked for, in order: the path in ``$CAI_LAMBDA_RIE``, ``aws-lambda-rie`` on
    ``PATH``, and ``aws-lambda-rie`` next to ``sys.executable`` (a virtualenv's bin).

    Returns:
        The binary's absolute path.

    Raises:
        ConfigError: ``$CAI_LAMBDA_RIE`` names a missing or non-executable file.
        CaiError: the binary is nowhere; the message says how to install it.
    """
    explicit = os.environ.get(RIE_ENV_VAR)
    if explicit:
        path = Path(explicit).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ConfigError(
                f"${RIE_ENV_VAR}={explicit}: expected an executable aws-lambda-rie binary"
            )
        return path.resolve()
    on_path = shutil.which(RIE_NAME)
    if on_path:
        return Path(on_path).resolve()
    beside = Path(sys.executable).parent / RIE_NAME
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside.resolve()
    raise CaiError(
        f"{RIE_NAME} not found (not in ${RIE_ENV_VAR}, not on PATH, not at {beside}); "
        "install it with `python -m cai.localaws install-rie`"
    )


def install_rie(
    dest_dir: str | os.PathLike[str],
    version: str | None = None,
    wheel: str | os.PathLike[str] | None = None,
) -> Path:
    """Install the Lambda RIE binary from PyPI's ``aws-sam-cli`` wheel into ``dest_dir``.

    Downloads the wheel with ``pip download --no-deps --only-binary :all:`` (unless
    ``wheel`` names one already downloaded), extracts only the member
    ``samcli/local/rapid/aws-lambda-rie-<arch>``, and renames it atomically to
    ``dest_dir/aws-lambda-rie`` with mode 755.

    Args:
        dest_dir: Folder to install into (created if missing), e.g. a virtualenv's bin.
        version: An ``aws-sam-cli`` version to pin; the newest if None.
        wheel: A local ``aws_sam_cli-*.whl`` to extract from instead of downloading.

    Returns:
        The installed binary's path.

    Raises:
        CaiError: pip failed, or the wheel does not hold the binary for this platform.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    member = f"samcli/local/rapid/aws-lambda-rie-{_rie_arch()}"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cai-rie-") as tmp:
        if wheel is None:
            spec = f"aws-sam-cli=={version}" if version else "aws-sam-cli"
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps"]
            cmd += ["--only-binary", ":all:", "--disable-pip-version-check", "-d", tmp]
            cmd.append(spec)
            logger.info("downloading %s with pip", spec)
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                raise CaiError(
                    f"pip download {spec} failed with status {done.returncode}: "
                    + " | ".join(tail)
                )
            found = sorted(Path(tmp).glob("aws_sam_cli-*.whl"))
            if not found:
                raise CaiError(
                    f"pip download {spec} left no aws_sam_cli-*.whl in {tmp}"
                )
            wheel_path = found[-1]
        else:
            wheel_path = Path(wheel)
        try:
            with zipfile.ZipFile(wheel_path) as zf:
                try:
                    info = zf.getinfo(member)
                except KeyError:
                    raise CaiError(
                        f"{wheel_path}: expected member {member}, not in this wheel"
                    ) from None
                part = dest / f".{RIE_NAME}.{os.getpid()}.part"
                with zf.open(info) as src, open(part, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        except (OSError, zipfile.BadZipFile) as err:
            raise CaiError(
                f"{wheel_path}: expected a readable wheel (zip): {err}"
            ) from None
        os.chmod(part, 0o755)
        target = dest / RIE_NAME
        os.replace(part, target)
    logger.info(
        "installed %s (%d bytes) from %s in %.1f s",
        target,
        target.stat().st_size,
        wheel_path.name,
        time.monotonic() - started,
    )
    return target


# ------------------------------------------------------------------------- the router


class _NoDelayConnection(http.client.HTTPConnection):
    """An HTTP connection with Nagle's algorithm off (requests are small and sequential)."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class _SlotFailure(Exception):
    """The RIE of a slot refused, dropped or timed out a connection."""


class _Slot:
    """One concurrency slot: one RIE process (and its runtime) on its own port."""

    def __init__(self, spec: Mapping[str, Any], pool: _Pool) -> None:
        self.index: int = spec["index"]
        self.port: int = spec["port"]
        self.api_port: int = spec["api_port"]
        self.cpu: int | None = spec["cpu"]
        self.log = Path(spec["log"])
        self.pid_file = Path(spec["pid_file"])
        self.tmp = Path(spec["tmp"])
        self.pool = pool
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: _NoDelayConnection | None = None
        self.busy = False
        self.broken = False
        self.restarts = 0
        self.invocations = 0

    def spawn(self) -> None:
        pool = self.pool
        emulator = f"{LOOPBACK}:{self.port}"
        runtime_api = f"{LOOPBACK}:{self.api_port}"
        cmd = [pool.rie, "--runtime-interface-emulator-address", emulator]
        cmd += ["--runtime-api-address", runtime_api, *pool.runtime_cmd]
        env = dict(pool.env, TMPDIR=str(self.tmp))
        self.tmp.mkdir(parents=True, exist_ok=True)
        pin = (
            functools.partial(os.sched_setaffinity, 0, {self.cpu})
            if self.cpu is not None
            else None
        )
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=pool.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=pin,
            )
        _write_json(
            self.pid_file, {"pid": self.proc.pid, "start": _start_time(self.proc.pid)}
        )

    def wait_ready(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not _port_open(self.port):
            assert self.proc is not None
            code = self.proc.poll()
            if code is not None or time.monotonic() >= deadline:
                why = (
                    f"exited with status {code} before listening"
                    if code is not None
                    else f"did not listen within {seconds:.0f} s"
                )
                raise CaiError(
                    f"slot {self.index}: RIE pid {self.proc.pid} {why} on "
                    f"{LOOPBACK}:{self.port}; see {self.log} (it says: {_log_says(self.log)})"
                )
            time.sleep(0.02)

    def kill(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.proc is None:
            return
        sid = self.proc.pid
        _signal_session(sid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_session(sid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(KILL_WAIT_S)
        _signal_session(sid, signal.SIGKILL)  # a runtime that outlived its RIE

    def call(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        """POST one invocation to this slot's RIE; (status, payload)."""
        for attempt in (1, 2):
            reused = self.conn is not None
            if self.conn is None:
                self.conn = _NoDelayConnection(
                    LOOPBACK, self.port, timeout=self.pool.timeout_s + 30
                )
            conn = self.conn
            try:
                conn.request("POST", _RIE_INVOKE_PATH, body, dict(headers))
                resp = conn.getresponse()
                payload = resp.read()
            except (OSError, http.client.HTTPException) as err:
                conn.close()
                self.conn = None
                alive = self.proc is not None and self.proc.poll() is None
                if attempt == 1 and reused and alive and isinstance(err, _STALE):
                    continue
                raise _SlotFailure(f"{type(err).__name__}: {err}") from err
            if resp.will_close:
                conn.close()
                self.conn = None
            return resp.status, payload
        raise AssertionError("unreachable")


class _Pool:
    """The RIE slots, handed out one invocation at a time, never queued."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.rie: str = cfg["rie"]
        self.runtime_cmd: list[str] = cfg["runtime_cmd"]
        self.env: dict[str, str] = cfg["env"]
        self.cwd: str = cfg["cwd"]
        self.timeout_s: int = cfg["timeout_s"]
        self.slots = [_Slot(spec, self) for spec in cfg["slots"]]
        self._free = list(reversed(self.slots))  # a stack: the last slot used is warm
        self._lock = threading.Lock()
        self.stopping = False
        self.throttled = 0

    def start(self) -> None:
        started = time.monotonic()
        for slot in self.slots:
            slot.spawn()
        for slot in self.slots:
            slot.wait_ready(SLOT_READY_S)
        for slot in self.slots:
            logger.info(
                "slot %d: RIE pid %d on %s:%d (runtime API %d, cpu %s), log %s",
                slot.index,
                slot.proc.pid if slot.proc else -1,
                LOOPBACK,
                slot.port,
                slot.api_port,
                slot.cpu,
                slot.log,
            )
        logger.info(
            "%d RIE slots up in %.2f s", len(self.slots), time.monotonic() - started
        )

    def stop(self) -> None:
        self.stopping = True
        started = time.monotonic()
        for slot in self.slots:
            if slot.proc is not None:
                _signal_session(slot.proc.pid, signal.SIGTERM)
        for slot in self.slots:
            slot.kill()
        logger.info(
            "%d RIE slots stopped in %.2f s",
            len(self.slots),
            time.monotonic() - started,
        )

    def acquire(self) -> _Slot | None:
        with self._lock:
            if not self._free or self.stopping:
                self.throttled += 1
                return None
            slot = self._free.pop()
            slot.busy = True
            return slot

    def release(self, slot: _Slot) -> None:
        with self._lock:
            slot.busy = False
            if not slot.broken:
                self._free.append(slot)

    def restart(self, slot: _Slot, reason: str) -> None:
        """Replace the slot's RIE; a slot that cannot restart leaves the pool."""
        if self.stopping:
            slot.broken = True
            return
        old = slot.proc.pid if slot.proc else -1
        started = time.monotonic()
        slot.kill()
        try:
            slot.spawn()
            slot.wait_ready(SLOT_READY_S)
        except (CaiError, OSError) as err:
            slot.broken = True
            logger.error(
                "slot %d: restart failed, slot removed from the pool: %s",
                slot.index,
                err,
            )
            return
        slot.restarts += 1
        logger.warning(
            "slot %d: RIE pid %d %s; restarted as pid %d on port %d in %.2f s (restart %d)",
            slot.index,
            old,
            reason,
            slot.proc.pid if slot.proc else -1,
            slot.port,
            time.monotonic() - started,
            slot.restarts,
        )

    def status(self) -> dict[str, Any]:
        return {
            "ready": not self.stopping,
            "throttled": self.throttled,
            "slots": [
                {
                    "index": s.index,
                    "port": s.port,
                    "pid": s.proc.pid if s.proc else None,
                    "alive": s.proc is not None and s.proc.poll() is None,
                    "busy": s.busy,
                    "broken": s.broken,
                    "restarts": s.restarts,
                    "invocations": s.invocations,
                }
                for s in self.slots
            ],
        }


class _RouterServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, port: int, pool: _Pool, moto_port: int) -> None:
        super().__init__((LOOPBACK, port), _RouterHandler, bind_and_activate=True)
        self.pool = pool
        self.moto_port = moto_port
        self.local = threading.local()


def _timeout_payload(payload: bytes, request_id: str) -> bytes:
    text = payload.decode(errors="replace").strip()
    return json.dumps(
        {
            "errorType": "Sandbox.Timedout",
            "errorMessage": f"RequestId: {request_id} Error: {text}",
        }
    ).encode()


def _is_error_payload(payload: bytes) -> bool:
    head = payload.lstrip()[:1]
    if head != b"{" or b'"errorType"' not in payload:
        return False
    try:
        obj = json.loads(payload)
    except ValueError:
        return False
    return isinstance(obj, dict) and "errorType" in obj and "errorMessage" in obj


class _RouterHandler(BaseHTTPRequestHandler):
    """One client connection: Lambda invokes to the pool, everything else to moto."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _RouterServer

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def _dispatch(self) -> None:
        try:
            body = self._read_body()
        except (ValueError, OSError) as err:
            self._reply_json(400, {"message": f"unreadable request body: {err}"})
            self.close_connection = True
            return
        path = self.path.split("?", 1)[0]
        if self.command == "POST" and _INVOKE_RE.match(path):
            self._invoke(body, unquote(_INVOKE_RE.match(path).group(1)))
        elif self.command == "GET" and path == STATUS_PATH:
            status = dict(self.server.pool.status(), moto_port=self.server.moto_port)
            self._reply_json(200, status)
        else:
            self._to_moto(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _dispatch

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ValueError("connection closed inside a chunked body")
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline(3)
            while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                pass  # trailer fields: none that moto needs
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _reply(
        self,
        status: int,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        length: str | None = None,
    ) -> None:
        self.send_response_only(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header(
            "Content-Length", length if length is not None else str(len(body))
        )
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _reply_json(
        self, status: int, obj: Any, extra: Sequence[tuple[str, str]] = ()
    ) -> None:
        headers = [("Content-Type", "application/json"), *extra]
        self._reply(status, headers, json.dumps(obj).encode())

    # ---- Lambda invokes

    def _invoke(self, body: bytes, function: str) -> None:
        pool = self.server.pool
        request_id = str(uuid.uuid4())
        kind = self.headers.get("X-Amz-Invocation-Type", "RequestResponse")
        if kind == "DryRun":
            self._reply(204, [("x-amzn-RequestId", request_id)], b"")
            return
        slot = pool.acquire()
        if slot is None:
            logger.debug("invoke %s: every slot busy, 429", function)
            self._reply(
                429,
                [
                    ("Content-Type", "application/json"),
                    ("x-amzn-ErrorType", "TooManyRequestsException"),
                    ("x-amzn-RequestId", request_id),
                ],
                _THROTTLE_BODY,
            )
            return
        headers = {
            k: self.headers[k] for k in _FORWARDED_INVOKE_HEADERS if k in self.headers
        }
        if kind == "Event":
            self._reply(202, [("x-amzn-RequestId", request_id)], b"")
            threading.Thread(
                target=self._run_on_slot,
                args=(slot, body, headers, request_id, function),
                daemon=True,
            ).start()
            return
        status, extra, payload = self._run_on_slot(
            slot, body, headers, request_id, function
        )
        self._reply(status, extra, payload)

    def _run_on_slot(
        self,
        slot: _Slot,
        body: bytes,
        headers: Mapping[str, str],
        request_id: str,
        function: str,
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        pool = self.server.pool
        base = [("Content-Type", "application/json"), ("x-amzn-RequestId", request_id)]
        try:
            if slot.proc is None or slot.proc.poll() is not None:
                code = slot.proc.poll() if slot.proc else None
                pool.restart(slot, f"had exited (status {code}) while idle")
                if slot.broken:
                    raise _SlotFailure("its RIE could not be restarted")
            status, payload = slot.call(body, headers)
        except _SlotFailure as err:
            if not slot.broken:
                pool.restart(slot, f"failed an invoke ({err})")
            pool.release(slot)
            fate = "removed from the pool" if slot.broken else "restarted"
            message = (
                f"local Lambda slot {slot.index} failed: {err}; its RIE was {fate}"
            )
            return (
                502,
                [*base, ("x-amzn-ErrorType", "ServiceException")],
                json.dumps({"Type": "Service", "message": message}).encode(),
            )
        slot.invocations += 1
        pool.release(slot)  # before answering, so the client's next call finds it free
        extra = [*base, ("X-Amz-Executed-Version", "$LATEST")]
        if status == 200:
            if payload.startswith(_TIMEOUT_PREFIX):
                payload = _timeout_payload(payload, request_id)
                extra.append(("X-Amz-Function-Error", "Unhandled"))
            elif _is_error_payload(payload):
                extra.append(("X-Amz-Function-Error", "Unhandled"))
        logger.debug(
            "invoke %s on slot %d: %d, %d bytes",
            function,
            slot.index,
            status,
            len(payload),
        )
        return status, extra, payload

    # ---- everything else

    def _to_moto(self, body: bytes) -> None:
        resp = self._moto_response(body)
        if resp is None:
            return
        out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _NOT_FORWARDED]
        length = resp.getheader("Content-Length")
        if self.command == "HEAD" or resp.status in (204, 304) or resp.status < 200:
            self._reply(resp.status, out, b"", length or "0")
        elif length is None or resp.chunked or int(length) <= _STREAM_ABOVE:
            self._reply(resp.status, out, resp.read())
        else:  # a large object: copy it through, not into memory
            self._reply(resp.status, out, b"", length)
            try:
                while chunk := resp.read(_STREAM_ABOVE):
                    self.wfile.write(chunk)
            except OSError as err:
                logger.warning("streaming %s from moto broke: %s", self.path, err)
                self.close_connection = True
                self.server.local.moto.close()
                self.server.local.moto = None
        if resp.will_close and self.server.local.moto is not None:
            self.server.local.moto.close()
            self.server.local.moto = None

    def _moto_response(self, body: bytes) -> http.client.HTTPResponse | None:
        """Send this request to moto on this thread's connection; None after a 502."""
        headers = [
            (k, v) for k, v in self.headers.items() if k.lower() not in _NOT_FORWARDED
        ]
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers.append(("Content-Length", str(len(body))))
        local = self.server.local
        port = self.server.moto_port
        for attempt in (1, 2):
            conn = getattr(local, "moto", None)
            reused = conn is not None
            if conn is None:
                conn = local.moto = _NoDelayConnection(LOOPBACK, port, timeout=900)
            try:
                conn.putrequest(
                    self.command, self.path, skip_host=True, skip_accept_encoding=True
                )
                for key, value in headers:
                    conn.putheader(key, value)
                conn.endheaders(body if body else None)
                return conn.getresponse()
            except (OSError, http.client.HTTPException) as err:
                conn.close()
                local.moto = None
                if attempt == 1 and reused and isinstance(err, _STALE):
                    continue  # moto closed an idle keep-alive connection
                logger.warning(
                    "moto on port %d failed %s %s: %s",
                    port,
                    self.command,
                    self.path,
                    err,
                )
                message = f"moto at {LOOPBACK}:{port} failed: {err}"
                self._reply_json(502, {"message": message})
                return None
        return None


def serve_router(config_path: str | os.PathLike[str]) -> int:
    """Run the router and its RIE pool in this process until SIGTERM or SIGINT.

    Args:
        config_path: The ``router.json`` that :meth:`LocalAws.start` wrote.

    Returns:
        0 after a clean stop, 1 when a slot did not come up.
    """
    cfg = json.loads(Path(config_path).read_text())
    pool = _Pool(cfg)
    server = _RouterServer(cfg["listen_port"], pool, cfg["moto_port"])
    try:
        pool.start()
    except (CaiError, OSError) as err:
        logger.error("%s", err)
        pool.stop()
        server.server_close()
        return 1

    def on_signal(signum: int, _frame: Any) -> None:
        logger.info("router got signal %d, stopping", signum)
        pool.stopping = True
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logger.info(
        "router pid %d listening on %s:%d: invokes -> %d RIE slots, rest -> moto on port %d",
        os.getpid(),
        LOOPBACK,
        cfg["listen_port"],
        len(pool.slots),
        cfg["moto_port"],
    )
    server.serve_forever(poll_interval=0.1)
    server.server_close()
    pool.stop()
    logger.info(
        "router stopped: %d invocations, %d throttled",
        sum(s.invocations for s in pool.slots),
        pool.throttled,
    )
    return 0


# ------------------------------------------------------------------------ the stack


def _http_json(port: int, method: str, path: str, body: Any = None) -> Any:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=2)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        payload = resp.read()
        if resp.status >= 300:
            raise OSError(f"HTTP {resp.status}: {payload[:200]!r}")
        return json.loads(payload)
    finally:
        conn.close()


def _wait_for(
    component: str,
    proc: subprocess.Popen[bytes],
    log: Path,
    seconds: float,
    probe: Callable[[], bool],
) -> None:
    deadline = time.monotonic() + seconds
    while True:
        code = proc.poll()
        if code is not None:
            raise CaiError(
                f"{component} (pid {proc.pid}) exited with status {code} during start-up; "
                f"see {log} (it says: {_log_says(log)})"
            )
        try:
            if probe():
                return
        except (OSError, ValueError, http.client.HTTPException):
            pass
        if time.monotonic() >= deadline:
            raise CaiError(
                f"{component} (pid {proc.pid}) did not answer within {seconds:.0f} s; "
                f"see {log} (it says: {_log_says(log)})"
            )
        time.sleep(0.05)


def _check_start_args(
    slots: Any,
    timeout_s: Any,
    memory_mb: Any,
    handler: str,
    handler_dir: Path,
    env: Mapping[str, Any],
) -> None:
    if not isinstance(slots, int) or slots < 1:
        raise ConfigError(f"slots={slots!r}: expected an integer >= 1")
    if not isinstance(timeout_s, int) or not 1 <= timeout_s <= 900:
        raise ConfigError(f"timeout_s={timeout_s!r}: expected an integer in 1..900")
    if not isinstance(memory_mb, int) or not 128 <= memory_mb <= 10240:
        raise ConfigError(f"memory_mb={memory_mb!r}: expected an integer in 128..10240")
    bad = [
        k for k, v in env.items() if not isinstance(k, str) or not isinstance(v, str)
    ]
    if bad:
        raise ConfigError(f"env keys {bad}: expected string names with string values")
    if not handler_dir.is_dir():
        raise ConfigError(
            f"handler_dir {handler_dir}: expected a folder holding the handler's module"
        )
    module, dot, func = handler.rpartition(".")
    if not dot or not module or not func:
        raise ConfigError(f"handler {handler!r}: expected '<module>.<function>'")
    rel = Path(*module.split("."))
    if (
        not (handler_dir / rel.with_suffix(".py")).is_file()
        and not (handler_dir / rel / "__init__.py").is_file()
    ):
        raise ConfigError(
            f"handler {handler!r}: expected {handler_dir / rel.with_suffix('.py')} "
            "(or a package of that name)"
        )


def _slot_specs(state: Path, ports: Sequence[int]) -> list[dict[str, Any]]:
    """Ports, CPU, log, pid file and /tmp of each slot; two ports per slot.

    Slot i gets CPU i mod (CPUs this process may use): a Lambda has vCPUs of its own,
    and on a small shared machine pinning keeps slots from oversubscribing every core.
    """
    cpus = sorted(os.sched_getaffinity(0))
    specs = []
    for i in range(len(ports) // 2):
        slot_dir = state / "slots" / str(i)
        slot_dir.mkdir(parents=True, exist_ok=True)
        (slot_dir / "rie.log").write_bytes(b"")
        specs.append(
            {
                "index": i,
                "port": ports[2 * i],
                "api_port": ports[2 * i + 1],
                "cpu": cpus[i % len(cpus)] if cpus else None,
                "log": str(slot_dir / "rie.log"),
                "pid_file": str(slot_dir / "rie.pid"),
                "tmp": str(slot_dir / "tmp"),
            }
        )
    return specs


def _path_list(*parts: str | None) -> str:
    return os.pathsep.join(p for p in parts if p)


class LocalAws:
    """A running local AWS stack (moto + router + RIE pool), started or attached to.

    Create one with :meth:`start` (which owns the processes) or :meth:`attach` (which
    reads ``stack.json`` of a stack started elsewhere). Use it as a context manager to
    stop the stack on exit.
    """

    def __init__(self, state_dir: Path, info: dict[str, Any]) -> None:
        self.state_dir = state_dir
        self.info = info
        self._procs: list[subprocess.Popen[bytes]] = []

    # ---- start / attach

    @classmethod
    def start(
        cls,
        state_dir: str | os.PathLike[str],
        slots: int = 4,
        handler: str = "handler.handler",
        handler_dir: str | os.PathLike[str] | None = None,
        timeout_s: int = 900,
        memory_mb: int = 3008,
        env: Mapping[str, str] | None = None,
        region: str = DEFAULT_REGION,
    ) -> LocalAws:
        """Start moto, the router and ``slots`` RIE processes; return once all answer.

        Args:
            state_dir: Folder for logs, pid files and ``stack.json`` (created).
            slots: Concurrent Lambda executions (one RIE each); more get HTTP 429.
            handler: ``<module>.<function>`` the runtime imports from ``handler_dir``.
            handler_dir: The function's code folder (Lambda's task root);
                ``<repo>/lambda`` if None.
            timeout_s: The function timeout in seconds (AWS_LAMBDA_FUNCTION_TIMEOUT).
            memory_mb: The memory size reported to the function (128 to 10240).
            env: Extra environment variables for the function.
            region: The region clients and the function use.

        Returns:
            The running stack; call :meth:`stop` (or use ``with``) to end it.

        Raises:
            ConfigError: An argument is out of range or the handler's module is missing.
            CaiError: The RIE binary is missing, a stack already runs in ``state_dir``,
                or a component did not come up (the message names its log file).
        """
        started = time.monotonic()
        state = Path(state_dir).resolve()
        code_dir = Path(handler_dir or DEFAULT_HANDLER_DIR).resolve()
        _check_start_args(slots, timeout_s, memory_mb, handler, code_dir, env or {})
        rie = find_rie()
        if (state / "stack.json").exists():
            old = cls.attach(state)
            if old.running():
                raise CaiError(
                    f"a local AWS stack already runs in {state} (endpoint "
                    f"{old.endpoint_url}); stop it first"
                )
            old.stop()  # whatever a dead stack left behind
        moto_port, router_port, *slot_ports = _free_ports(2 + 2 * slots)
        endpoint = f"http://{LOOPBACK}:{router_port}"
        pool = _slot_specs(state, slot_ports)
        fn_env = _clean_env(
            {
                "AWS_LAMBDA_FUNCTION_NAME": "function",
                "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
                "AWS_LAMBDA_FUNCTION_TIMEOUT": str(timeout_s),
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(memory_mb),
                "AWS_REGION": region,
                "AWS_DEFAULT_REGION": region,
                "AWS_ACCESS_KEY_ID": FAKE_KEY,
                "AWS_SECRET_ACCESS_KEY": FAKE_KEY,
                "AWS_SESSION_TOKEN": FAKE_KEY,
                "AWS_ENDPOINT_URL": endpoint,
                "LAMBDA_TASK_ROOT": str(code_dir),
                "_HANDLER": handler,
                "PYTHONPATH": _path_list(str(code_dir), os.environ.get("PYTHONPATH")),
                **(env or {}),
            }
        )
        router_cfg = {
            "listen_port": router_port,
            "moto_port": moto_port,
            "rie": str(rie),
            "runtime_cmd": [sys.executable, "-m", "awslambdaric", handler],
            "cwd": str(code_dir),
            "env": fn_env,
            "timeout_s": timeout_s,
            "slots": pool,
        }
        _write_json(state / "router.json", router_cfg)
        info: dict[str, Any] = {
            "version": 1,
            "state_dir": str(state),
            "endpoint_url": endpoint,
            "region": region,
            "handler": handler,
            "handler_dir": str(code_dir),
            "timeout_s": timeout_s,
            "memory_mb": memory_mb,
            "rie": str(rie),
            "moto": {"port": moto_port, "log": str(state / "moto.log")},
            "router": {"port": router_port, "log": str(state / "router.log")},
            "slots": pool,
        }
        stack = cls(state, info)
        try:
            stack._launch()
        except BaseException:
            stack.stop()
            raise
        info["started_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        info["start_seconds"] = round(time.monotonic() - started, 3)
        _write_json(state / "stack.json", dict(info, ready=True))
        logger.info(
            "local AWS stack up in %.2f s: endpoint %s, moto port %d, %d slots on ports %s",
            info["start_seconds"],
            endpoint,
            moto_port,
            slots,
            ",".join(str(s["port"]) for s in pool),
        )
        return stack

    def _launch(self) -> None:
        """Spawn moto and the router (which spawns the pool); wait until both answer."""
        info, state = self.info, self.state_dir
        moto_port, router_port = info["moto"]["port"], info["router"]["port"]
        src_dir = str(Path(__file__).resolve().parents[1])  # cai, for the router
        pythonpath = _path_list(src_dir, os.environ.get("PYTHONPATH"))
        moto_log, router_log = Path(info["moto"]["log"]), Path(info["router"]["log"])
        moto = self._spawn(
            "moto",
            [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(moto_port)],
            _clean_env({"MOTO_PORT": str(router_port)}),
            moto_log,
        )
        router_cmd = [sys.executable, "-m", "cai.localaws", "router"]
        router = self._spawn(
            "router",
            [*router_cmd, "--config", str(state / "router.json")],
            _clean_env({"PYTHONPATH": pythonpath}),
            router_log,
        )
        t0 = time.monotonic()
        config = {
            "stepfunctions": {"execute_state_machine": True},
            "lambda": {"use_docker": False},
        }
        _write_json(state / "stack.json", dict(info, ready=False))  # stoppable from now
        _wait_for(
            "moto server",
            moto,
            moto_log,
            MOTO_READY_S,
            lambda: (
                _http_json(moto_port, "POST", "/moto-api/config", config) is not None
            ),
        )
        logger.info(
            "moto pid %d up on %s:%d in %.2f s (MOTO_PORT=%d, Step Functions execution on)",
            moto.pid,
            LOOPBACK,
            moto_port,
            time.monotonic() - t0,
            router_port,
        )
        _wait_for(
            "router",
            router,
            router_log,
            ROUTER_READY_S,
            lambda: bool(_http_json(router_port, "GET", STATUS_PATH).get("ready")),
        )
        logger.info(
            "router pid %d up on %s:%d in %.2f s with %d RIE slots",
            router.pid,
            LOOPBACK,
            router_port,
            time.monotonic() - t0,
            len(info["slots"]),
        )

    def _spawn(
        self, name: str, cmd: list[str], env: dict[str, str], log: Path
    ) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._procs.append(proc)
        self.info[name].update(pid=proc.pid, start=_start_time(proc.pid))
        return proc

    @classmethod
    def attach(cls, state_dir: str | os.PathLike[str]) -> LocalAws:
        """The stack described by ``state_dir/stack.json``, e.g. started by another process.

        Raises:
            CaiError: There is no readable ``stack.json`` in ``state_dir``.
        """
        state = Path(state_dir).resolve()
        path = state / "stack.json"
        try:
            info = json.loads(path.read_text())
        except FileNotFoundError:
            raise CaiError(
                f"{path}: no local AWS stack here; start one with "
                f"`python -m cai.localaws start --state {state}`"
            ) from None
        except (OSError, ValueError) as err:
            raise CaiError(
                f"{path}: expected the stack's JSON description: {err}"
            ) from None
        return cls(state, info)

    # ---- use

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<router port>``, the one endpoint of every service."""
        return self.info["endpoint_url"]

    @property
    def region(self) -> str:
        """The stack's region."""
        return self.info["region"]

    def env(self) -> dict[str, str]:
        """The environment variables a client (boto3, the AWS CLI) needs to use the stack."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": FAKE_KEY,
            "AWS_SECRET_ACCESS_KEY": FAKE_KEY,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }

    def client(self, service: str, **kwargs: Any) -> Any:
        """A boto3 client for ``service`` pointed at the stack (kwargs go to boto3)."""
        import boto3

        kwargs.setdefault("endpoint_url", self.endpoint_url)
        kwargs.setdefault("region_name", self.region)
        kwargs.setdefault("aws_access_key_id", FAKE_KEY)
        kwargs.setdefault("aws_secret_access_key", FAKE_KEY)
        return boto3.client(service, **kwargs)

    def create_role(self, name: str) -> str:
        """ARN of IAM role ``name`` (created if missing) that Lambda may assume."""
        return create_role(name, self.env())

    def router_status(self) -> dict[str, Any]:
        """The router's view of its slots (pids, ports, busy, restarts, invocations)."""
        return _http_json(self.info["router"]["port"], "GET", STATUS_PATH)

    def _slot_pids(self) -> dict[int, tuple[int, int | None]]:
        """Slot index -> (pid, start time) of its current RIE, from the router's pid files."""
        found = {}
        for spec in self.info["slots"]:
            with contextlib.suppress(OSError, ValueError, KeyError):
                rec = json.loads(Path(spec["pid_file"]).read_text())
                found[spec["index"]] = (int(rec["pid"]), rec.get("start"))
        return found

    def _sessions(self) -> set[int]:
        """Session ids of the stack's components, skipping pids reused by others."""
        recs = [
            (self.info[n].get("pid"), self.info[n].get("start"))
            for n in ("moto", "router")
        ]
        recs += self._slot_pids().values()
        sessions = set()
        for pid, start in recs:
            if not pid:
                continue
            stat = _proc_stat(pid)
            # A dead leader's pid is not reused while its session has members.
            if stat is None or stat[0] in ("Z", "X") or start in (None, stat[2]):
                sessions.add(pid)
        return sessions

    def processes(self) -> list[int]:
        """Live pids of the stack: moto, router, every RIE and every runtime it started."""
        return _session_members(self._sessions())

    def status(self) -> dict[str, Any]:
        """Liveness, pid and port of each component, read from the process table."""
        out: dict[str, Any] = {
            "state_dir": str(self.state_dir),
            "endpoint_url": self.endpoint_url,
        }
        for name in ("moto", "router"):
            rec = self.info[name]
            out[name] = {
                "pid": rec.get("pid"),
                "port": rec["port"],
                "alive": _alive(rec.get("pid"), rec.get("start")),
                "log": rec["log"],
            }
        pids = self._slot_pids()
        out["slots"] = [
            {
                "index": spec["index"],
                "port": spec["port"],
                "pid": pids.get(spec["index"], (None, None))[0],
                "alive": _alive(*pids.get(spec["index"], (None, None))),
                "log": spec["log"],
            }
            for spec in self.info["slots"]
        ]
        return out

    def running(self) -> bool:
        """Whether the router and moto both run."""
        return all(
            _alive(self.info[n].get("pid"), self.info[n].get("start"))
            for n in ("moto", "router")
        )

    # ---- stop

    def stop(self) -> None:
        """Stop every process of the stack (SIGTERM, then SIGKILL after a few seconds).

        Each component runs in a session of its own, so runtimes started by an RIE die
        with it. Safe to call twice and on a stack started by another process.
        """
        started = time.monotonic()
        router, moto = self.info.get("router", {}), self.info.get("moto", {})
        for rec in (router, moto):
            if _alive(rec.get("pid"), rec.get("start")):
                _signal_session(rec["pid"], signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S + 1
        while (
            _alive(router.get("pid"), router.get("start"))
            and time.monotonic() < deadline
        ):
            time.sleep(0.02)  # the router stops its own slots first
        for pid, start in self._slot_pids().values():
            if _alive(pid, start):
                _signal_session(pid, signal.SIGTERM)
        sessions = self._sessions()
        left = _wait_sessions_empty(sessions, STOP_GRACE_S)
        if left:
            logger.warning("stack processes %s ignored SIGTERM; sending SIGKILL", left)
            for sid in sessions:
                _signal_session(sid, signal.SIGKILL)
            left = _wait_sessions_empty(sessions, KILL_WAIT_S)
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(KILL_WAIT_S)
        self._procs.clear()
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / "stack.json").unlink()
        if left:
            raise CaiError(
                f"stack in {self.state_dir}: processes {left} survived SIGKILL"
            )
        logger.info(
            "local AWS stack in %s stopped in %.2f s (%d sessions)",
            self.state_dir,
            time.monotonic() - started,
            len(sessions),
        )

    def __enter__(self) -> LocalAws:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def create_role(name: str, env: Mapping[str, str] | None = None) -> str:
    """ARN of IAM role ``name`` with a Lambda (and Step Functions) trust policy.

    Created through boto3 against the endpoint in ``env`` (``LocalAws.env()``; the
    process environment if None); an existing role of that name is reused.

    Raises:
        CaiError: IAM refused to create or return the role.
    """
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    cfg = dict(os.environ if env is None else env)
    iam = boto3.client(
        "iam",
        endpoint_url=cfg.get("AWS_ENDPOINT_URL"),
        region_name=cfg.get("AWS_REGION")
        or cfg.get("AWS_DEFAULT_REGION")
        or DEFAULT_REGION,
        aws_access_key_id=cfg.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=cfg.get("AWS_SECRET_ACCESS_KEY"),
    )
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {
                    "Service": ["lambda.amazonaws.com", "states.amazonaws.com"]
                },
                "Action": "sts:AssumeRole",
            }
        ],
    }
    try:
        try:
            role = iam.create_role(
                RoleName=name, AssumeRolePolicyDocument=json.dumps(trust)
            )
        except ClientError as err:
            if err.response["Error"]["Code"] != "EntityAlreadyExists":
                raise
            role = iam.get_role(RoleName=name)
    except (ClientError, BotoCoreError) as err:
        raise CaiError(
            f"IAM role {name!r} at {cfg.get('AWS_ENDPOINT_URL')}: {err}"
        ) from None
    return role["Role"]["Arn"]


# ------------------------------------------------------------------------------ CLI


def build_parser(
    parser: argparse.ArgumentParser | None = None,
) -> argparse.ArgumentParser:
    """Add the ``start|stop|status|env|install-rie`` subcommands to ``parser`` (or a new one).

    Mount it under another CLI with ``build_parser(subparsers.add_parser("local-aws"))``
    and call :func:`run` with the parsed arguments.
    """
    if parser is None:
        parser = argparse.ArgumentParser(
            prog="python -m cai.localaws", description=__doc__.split("\n\n")[0]
        )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"the stack's folder of logs, pids and stack.json (default {DEFAULT_STATE_DIR})",
    )
    sub = parser.add_subparsers(dest="aws_action", metavar="ACTION", required=True)
    start = sub.add_parser(
        "start",
        parents=[common],
        help="start moto, the router and the RIE pool in the background",
    )
    start.add_argument(
        "--slots", type=int, default=4, help="concurrent Lambda slots (default 4)"
    )
    start.add_argument(
        "--handler",
        default="handler.handler",
        help="module.function (default handler.handler)",
    )
    start.add_argument(
        "--handler-dir",
        type=Path,
        default=DEFAULT_HANDLER_DIR,
        help=f"the function's code folder (default {DEFAULT_HANDLER_DIR})",
    )
    start.add_argument(
        "--timeout-s", type=int, default=900, help="function timeout (default 900)"
    )
    start.add_argument(
        "--memory-mb", type=int, default=3008, help="memory size (default 3008)"
    )
    start.add_argument(
        "--region", default=DEFAULT_REGION, help=f"(default {DEFAULT_REGION})"
    )
    start.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra variable for the function (repeatable)",
    )
    sub.add_parser("stop", parents=[common], help="stop the stack")
    sub.add_parser(
        "status", parents=[common], help="show each component; exit 1 if one is down"
    )
    sub.add_parser("env", parents=[common], help="print `export K=V` lines for eval")
    install = sub.add_parser(
        "install-rie", help="install aws-lambda-rie from PyPI's aws-sam-cli"
    )
    install.add_argument(
        "--dest",
        type=Path,
        default=Path(sys.executable).parent,
        help=f"target folder (default {Path(sys.executable).parent})",
    )
    install.add_argument(
        "--version", default=None, help="aws-sam-cli version (default newest)"
    )
    install.add_argument(
        "--wheel", type=Path, default=None, help="use this downloaded wheel"
    )
    router = sub.add_parser(
        "router", help="internal: the router process that `start` runs"
    )
    router.add_argument(
        "--config", type=Path, required=True, help="router.json of the stack"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Carry out the parsed subcommand; returns the exit status.

    Raises:
        CaiError: A bad argument, a missing RIE or a component that did not come up.
    """
    action = args.aws_action
    if action == "router":
        return serve_router(args.config)
    if action == "install-rie":
        print(install_rie(args.dest, args.version, args.wheel))
        return 0
    if action == "start":
        extra = {}
        for item in args.env:
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ConfigError(f"--env {item!r}: expected KEY=VALUE")
            extra[key] = value
        stack = LocalAws.start(
            args.state,
            slots=args.slots,
            handler=args.handler,
            handler_dir=args.handler_dir,
            timeout_s=args.timeout_s,
            memory_mb=args.memory_mb,
            env=extra,
            region=args.region,
        )
        print(stack.endpoint_url)
        return 0
    if action == "stop":
        try:
            stack = LocalAws.attach(args.state)
        except CaiError:
            print(f"no local AWS stack in {args.state}")
            return 0
        stack.stop()
        return 0
    stack = LocalAws.attach(args.state)
    if action == "env":
        for key, value in stack.env().items():
            print(f"export {key}={value}")
        return 0
    status = stack.status()
    print(f"endpoint {status['endpoint_url']} (state {status['state_dir']})")
    rows = [("moto", status["moto"]), ("router", status["router"])]
    rows += [(f"slot {s['index']}", s) for s in status["slots"]]
    for name, rec in rows:
        state = "up" if rec["alive"] else "DOWN"
        print(
            f"{name:8} {state:4} pid {rec['pid']} port {rec['port']} log {rec['log']}"
        )
    return 0 if all(rec["alive"] for _, rec in rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cai.localaws``: parse ``argv``, set up logging, run; exit 2 on CaiError."""
    from cai.logs import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(prefix="router" if args.aws_action == "router" else "local-aws")
    try:
        return run(args)
    except CaiError as err:
        print(f"cai.localaws {args.aws_action}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
