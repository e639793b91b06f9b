"""Fan-out of Lambda invocations with bounded concurrency, retries and billing records.

Each invocation is a synchronous ``Invoke`` (RequestResponse, ``LogType=Tail``) from a
pool of ``concurrency`` threads sharing one boto3 client. What fails is sorted into

* throttled (HTTP 429 ``TooManyRequestsException``: concurrency or rate exhausted),
* service (HTTP 5xx) and network (connection reset, read timeout) errors,
* timeout (the function ran past its timeout, ``Sandbox.Timedout``),
* function errors (the handler raised),
* data errors (the handler raised one of CAI's input errors: a corrupt or malformed
  partition, a bad event): retrying cannot help, so these are not retried,
* anything else (no such function, access denied): not retried either.

The retryable ones are retried (failures up to ``max_attempts``, throttles up to
``max_throttles``) with capped exponential backoff and full jitter (a random wait in
[0, min(cap, base * 2^(attempt-1))]), so throttled callers spread out instead of
retrying in step. botocore's own retries are switched off
on the client (see :func:`lambda_client`) so that every attempt is counted here.

Every invocation yields one record: request id, start, end, duration, billed duration,
memory size, max memory used, init (cold start) duration, attempts, throttles, cold or
warm. On AWS the figures come from the ``REPORT`` line at the tail of the invocation's
log (``report_source: log``); where no log tail comes back (the local Runtime Interface
Emulator), from the handler's own summary (``report_source: handler``).
"""

from __future__ import annotations

import base64
import concurrent.futures
import itertools
import json
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError, ResponseStreamingError
from botocore.exceptions import ConnectionError as BotoConnectionError

from cai.errors import CaiError

_logger = logging.getLogger(__name__)

THROTTLE_CODES = frozenset(
    {
        "TooManyRequestsException",
        "ThrottlingException",
        "Throttling",
        "RequestLimitExceeded",
    }
)
# Errors of CAI's own input checks: the same event fails the same way every time.
DATA_ERROR_TYPES = frozenset(
    {
        "ChecksumError",
        "DataFormatError",
        "ConfigError",
        "CheckpointError",
        "StagingError",
    }
)
TIMEOUT_ERROR_TYPE = "Sandbox.Timedout"
PROGRESS_EVERY_S = 10.0
# A time-out is billed in full and likely to recur: one retry (a cold start or a slow
# neighbour may have caused it), then the invocation is reported.
TIMEOUT_RETRIES_MAX = 1
BACKOFF_DOUBLINGS_MAX = 30  # 2^30 x base is past any cap; keeps the float finite
CLIENT_READ_MARGIN_S = 60  # the client waits this long past the function's timeout
_REPORT_FIELDS = {
    "duration_ms": r"(?:^|\t)Duration: ([\d.]+) ms",
    "billed_ms": r"Billed Duration: (\d+) ms",
    "memory_mb": r"Memory Size: (\d+) MB",
    "max_memory_mb": r"Max Memory Used: (\d+) MB",
    "init_ms": r"Init Duration: ([\d.]+) ms",
}


class InvocationError(CaiError):
    """Some invocations failed after their retries; the message lists them."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry one invocation.

    Throttled attempts never ran the function and say only "not now": they have a
    budget of their own, so that a burst of 429s does not use up the attempts meant
    for real failures.

    Attributes:
        max_attempts: Attempts that failed (not throttled), the first included.
        base_s: Backoff of the first retry (before jitter), seconds.
        cap_s: Longest backoff, seconds.
        max_throttles: Throttled attempts tolerated before giving up.
    """

    max_attempts: int = 4
    base_s: float = 0.5
    cap_s: float = 20.0
    max_throttles: int = 100

    def backoff_s(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry`` (1, 2, ...): full jitter."""
        return rng.uniform(0.0, min(self.cap_s, self.base_s * 2 ** (retry - 1)))


def lambda_client(
    session: boto3.session.Session,
    timeout_s: int,
    concurrency: int,
    connect_timeout_s: int = 10,
) -> Any:
    """A Lambda client for fan-out: no botocore retries (they are counted here), a read
    timeout past the function's own, a connection per thread. The endpoint is
    boto3's usual (``AWS_ENDPOINT_URL_LAMBDA`` / ``AWS_ENDPOINT_URL`` when set)."""
    config = Config(
        retries={"total_max_attempts": 1, "mode": "standard"},
        read_timeout=timeout_s + CLIENT_READ_MARGIN_S,
        connect_timeout=connect_timeout_s,
        max_pool_connections=concurrency + 4,
    )
    return session.client("lambda", config=config)


def parse_report(log_tail: str) -> dict[str, float]:
    """Figures of the last ``REPORT`` line of a Lambda log tail (empty if none)."""
    lines = [line for line in log_tail.splitlines() if line.startswith("REPORT ")]
    if not lines:
        return {}
    out = {}
    for field, pattern in _REPORT_FIELDS.items():
        found = re.search(pattern, lines[-1])
        if found:
            out[field] = float(found.group(1))
    return out


def _classify_client_error(err: ClientError) -> tuple[str, bool]:
    code = err.response.get("Error", {}).get("Code", "")
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code in THROTTLE_CODES or status == 429:
        return "throttled", True
    if status >= 500:
        return "service", True
    return "client", False


def _classify_function_error(payload: Any) -> tuple[str, bool, str, str]:
    if isinstance(payload, dict):
        error_type = str(payload.get("errorType", "Unhandled"))
        message = str(payload.get("errorMessage", ""))
    else:
        error_type, message = "Unhandled", str(payload)
    if error_type == TIMEOUT_ERROR_TYPE or "Task timed out" in message:
        return "timeout", True, error_type, message
    if error_type in DATA_ERROR_TYPES:
        return "data", False, error_type, message
    return "function", True, error_type, message


def invoke_one(
    client: Any,
    function: str,
    number: int,
    event: dict[str, Any],
    policy: RetryPolicy,
    rng: random.Random | None = None,
    sleep: Callable[[float], None] = time.sleep,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Invoke ``function`` with ``event`` until it succeeds or retrying is pointless
    (or ``stop`` is set: the run is being cancelled).

    Returns the invocation's record (``status`` ok or failed); never raises for an
    invocation failure.
    """
    rng = rng or random.Random()
    payload = json.dumps(event).encode()
    record: dict[str, Any] = {
        "invocation": number,
        "status": "failed",
        "attempts": 0,
        "throttles": 0,
        "retries": 0,
        "requests": 0,  # attempts that ran the function (billed)
        "billed_ms": 0.0,
        "started_at": time.time(),
        "error_kind": None,
        "error_type": None,
        "error": None,
    }
    failures = 0  # failed attempts that count against max_attempts (not throttles)
    timeouts = 0
    for attempt in itertools.count(1):
        record["attempts"] = attempt
        tick = time.perf_counter()
        kind = None
        try:
            response = client.invoke(
                FunctionName=function, Payload=payload, LogType="Tail"
            )
            body = response["Payload"].read()
        except ClientError as err:
            kind, retryable = _classify_client_error(err)
            record["error_type"] = err.response.get("Error", {}).get("Code")
            record["error"] = str(err)
        except (BotoConnectionError, HTTPClientError, ResponseStreamingError) as err:
            kind, retryable = "network", True
            record["error_type"], record["error"] = type(err).__name__, str(err)
        round_trip_ms = (time.perf_counter() - tick) * 1000
        if kind is None:
            record["requests"] += 1
            report = parse_report(
                base64.b64decode(response.get("LogResult", "")).decode(errors="replace")
            )
            try:
                result = json.loads(body) if body else None
            except json.JSONDecodeError:
                result = body.decode(errors="replace")
            if response.get("FunctionError"):
                kind, retryable, record["error_type"], record["error"] = (
                    _classify_function_error(result)
                )
                # A failed attempt is billed too; without a log tail, the round trip
                # is the closest bound of its duration.
                record["billed_ms"] += report.get("billed_ms", math.ceil(round_trip_ms))
            else:
                _fill_success(record, result, report, response, round_trip_ms)
                return record
        record["error_kind"] = kind
        if kind == "throttled":
            record["throttles"] += 1
        else:
            failures += 1
        timeouts += kind == "timeout"
        if (
            not retryable
            or failures >= policy.max_attempts
            or record["throttles"] > policy.max_throttles
            or timeouts > TIMEOUT_RETRIES_MAX
            or (stop is not None and stop.is_set())
        ):
            break
        record["retries"] += 1
        wait = policy.backoff_s(min(attempt, BACKOFF_DOUBLINGS_MAX), rng)
        _logger.debug(
            "invocation %d attempt %d: %s (%s); retrying in %.2f s",
            number,
            attempt,
            kind,
            record["error_type"],
            wait,
        )
        sleep(wait)
    record["ended_at"] = time.time()
    return record


def _fill_success(
    record: dict[str, Any],
    result: Any,
    report: dict[str, float],
    response: dict[str, Any],
    round_trip_ms: float,
) -> None:
    summary = result if isinstance(result, dict) else {}
    handler_ms = summary.get("duration_ms")
    record.update(
        status="ok",
        error_kind=None,
        error_type=None,
        error=None,
        ended_at=time.time(),
        round_trip_ms=round_trip_ms,
        request_id=response.get("ResponseMetadata", {})
        .get("HTTPHeaders", {})
        .get("x-amzn-requestid")
        or summary.get("request_id"),
        cold=summary.get("cold"),
    )
    if report:
        record["report_source"] = "log"
        record["duration_ms"] = report.get("duration_ms")
        record["billed_ms"] += report.get("billed_ms", 0.0)
        record["memory_mb"] = report.get("memory_mb")
        record["max_memory_mb"] = report.get("max_memory_mb")
        record["init_ms"] = report.get("init_ms", 0.0)
        record["cold"] = "init_ms" in report
    else:
        record["report_source"] = "handler" if handler_ms is not None else "client"
        duration = handler_ms if handler_ms is not None else round_trip_ms
        record["duration_ms"] = duration
        record["billed_ms"] += math.ceil(duration)  # Lambda bills by the millisecond
        record["memory_mb"] = summary.get("memory_limit_mb")
        record["max_memory_mb"] = summary.get("max_memory_used_mb")
        record["init_ms"] = 1000 * summary.get("init_s", 0.0)
    record["summary"] = summary


def _not_run(number: int, error: str, kind: str = "cancelled") -> dict[str, Any]:
    """The record of an invocation that never got an answer."""
    now = time.time()
    return {
        "invocation": number,
        "status": "failed",
        "attempts": 0,
        "throttles": 0,
        "retries": 0,
        "requests": 0,
        "billed_ms": 0.0,
        "started_at": now,
        "ended_at": now,
        "error_kind": kind,
        "error_type": kind,
        "error": error,
    }


def dispatch(
    client: Any,
    function: str,
    events: Sequence[tuple[int, dict[str, Any]]],
    concurrency: int,
    policy: RetryPolicy,
    seed: int | None = None,
) -> list[dict[str, Any]]:
    """Invoke ``function`` once per (number, event), ``concurrency`` at a time.

    Returns one record per event, in the order given; failures are records with
    ``status: failed`` (the caller decides what a failure means for the run).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    started = time.perf_counter()
    rng_seed = random.Random(seed)
    lock = threading.Lock()
    done = {"n": 0, "failed": 0, "throttles": 0, "last_log": started}

    stop = threading.Event()

    def one(item: tuple[int, dict[str, Any]], rng: random.Random) -> dict[str, Any]:
        number, event = item
        if stop.is_set():
            return _not_run(number, "cancelled before it started")
        try:
            record = invoke_one(client, function, number, event, policy, rng, stop=stop)
        except (
            Exception
        ) as err:  # a bug or an unforeseen error: keep the others' records
            record = _not_run(number, f"{type(err).__name__}: {err}", "internal")
        with lock:
            done["n"] += 1
            done["failed"] += record["status"] != "ok"
            done["throttles"] += record["throttles"]
            now = time.perf_counter()
            if now - done["last_log"] >= PROGRESS_EVERY_S:
                done["last_log"] = now
                _logger.info(
                    "dispatch: %d/%d invocations done, %d failed, %d throttled "
                    "attempts, %.1f invocations/s",
                    done["n"],
                    len(events),
                    done["failed"],
                    done["throttles"],
                    done["n"] / (now - started),
                )
        return record

    rngs = [random.Random(rng_seed.random()) for _ in events]
    pool = concurrent.futures.ThreadPoolExecutor(concurrency)
    try:
        records = list(pool.map(one, events, rngs))
    except BaseException:
        # Cancelled (SIGTERM, Ctrl-C): invoke nothing more, let running calls return.
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    seconds = time.perf_counter() - started
    _logger.info(
        "dispatch: %d invocations of %s in %.1f s (%.1f/s, concurrency %d): %d ok, "
        "%d failed, %d retries, %d throttled attempts",
        len(records),
        function,
        seconds,
        len(records) / seconds if seconds else float("nan"),
        concurrency,
        sum(r["status"] == "ok" for r in records),
        sum(r["status"] != "ok" for r in records),
        sum(r["retries"] for r in records),
        sum(r["throttles"] for r in records),
    )
    return records
