"""Tests of the local AWS stack (cai.localaws): moto, the router and the RIE pool.

They run the real runtime client (awslambdaric) under the Lambda Runtime Interface
Emulator with the handlers in tests/lambda_handlers/echo.py, so what they check is what a
deployed function would show: results, cold and warm starts, errors, timeouts, throttling
and Step Functions fan-out. Without the RIE binary they skip, or fail when CI=true.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import platform
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest

from cai.errors import CaiError, ConfigError
from cai.localaws import LocalAws, find_rie, install_rie

pytestmark = pytest.mark.aws

HANDLERS = Path(__file__).parent / "lambda_handlers"
MB = 1024 * 1024
SFN_CAP_S = 30.0


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (dead, not yet reaped by pid 1) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def _no_retry(**extra):
    from botocore.config import Config

    return Config(retries={"total_max_attempts": 1}, **extra)


@pytest.fixture(scope="module")
def rie() -> Path:
    """The RIE binary; its absence fails the test under CI and skips it elsewhere."""
    try:
        return find_rie()
    except CaiError as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the Lambda RIE is required under CI: {err}")
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def stack(rie, tmp_path_factory):
    """Four slots of ``echo.crash``: echoes events, raises for ``{"crash": true}``."""
    state = tmp_path_factory.mktemp("aws-main")
    with LocalAws.start(
        state, slots=4, handler="echo.crash", handler_dir=HANDLERS
    ) as aws:
        yield aws


@pytest.fixture(scope="module")
def short_stack(rie, tmp_path_factory):
    """One slot of ``echo.sleep`` with a 1 s function timeout."""
    state = tmp_path_factory.mktemp("aws-short")
    with LocalAws.start(
        state, slots=1, handler="echo.sleep", handler_dir=HANDLERS, timeout_s=1
    ) as aws:
        yield aws


def _invoke(lam, payload: dict, name: str = "echo") -> tuple[dict, dict]:
    resp = lam.invoke(FunctionName=name, Payload=json.dumps(payload).encode())
    return resp, json.loads(resp["Payload"].read())


def test_s3_round_trip_through_router(stack, tmp_path):
    from boto3.s3.transfer import TransferConfig

    s3 = stack.client("s3")
    s3.create_bucket(Bucket="round-trip")
    s3.put_object(Bucket="round-trip", Key="small.txt", Body=b"hello lambda")
    got = s3.get_object(Bucket="round-trip", Key="small.txt")
    assert got["Body"].read() == b"hello lambda"
    assert s3.head_object(Bucket="round-trip", Key="small.txt")["ContentLength"] == 12

    for i in range(25):
        s3.put_object(Bucket="round-trip", Key=f"many/{i:03d}", Body=b"x" * i)
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket="round-trip", Prefix="many/", PaginationConfig={"PageSize": 10}
    )
    keys = [[o["Key"] for o in page["Contents"]] for page in pages]
    assert [len(page) for page in keys] == [10, 10, 5]
    assert [k for page in keys for k in page] == [f"many/{i:03d}" for i in range(25)]

    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(20 * MB))
    cfg = TransferConfig(
        multipart_threshold=8 * MB, multipart_chunksize=8 * MB, max_concurrency=4
    )
    s3.upload_file(str(big), "round-trip", "big.bin", Config=cfg)
    head = s3.head_object(Bucket="round-trip", Key="big.bin")
    assert head["ContentLength"] == 20 * MB
    assert (
        head["ETag"].strip('"').endswith("-3")
    )  # three parts: a real multipart upload
    back = tmp_path / "back.bin"
    s3.download_file("round-trip", "big.bin", str(back), Config=cfg)
    assert (
        hashlib.sha256(back.read_bytes()).digest()
        == hashlib.sha256(big.read_bytes()).digest()
    )


def test_chunked_request_bodies_reach_moto(stack):
    """Transfer-Encoding: chunked, plain and with aws-chunked framing inside (botocore/HTTPS)."""
    s3 = stack.client("s3")
    s3.create_bucket(Bucket="chunked")
    data = os.urandom(300_000)
    conn = http.client.HTTPConnection(
        "127.0.0.1", stack.info["router"]["port"], timeout=30
    )
    pieces = (data[i : i + 65536] for i in range(0, len(data), 65536))
    conn.request("PUT", "/chunked/plain", body=pieces, encode_chunked=True)
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200

    crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big"))
    framed = b"".join(
        b"%x\r\n%s\r\n" % (len(data[i : i + 65536]), data[i : i + 65536])
        for i in range(0, len(data), 65536)
    )
    framed += b"0\r\nx-amz-checksum-crc32:" + crc + b"\r\n\r\n"
    headers = {
        "Content-Encoding": "aws-chunked",
        "x-amz-decoded-content-length": str(len(data)),
        "x-amz-trailer": "x-amz-checksum-crc32",
        "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
    }
    pieces = (framed[i : i + 50000] for i in range(0, len(framed), 50000))
    conn.request(
        "PUT", "/chunked/aws", body=pieces, headers=headers, encode_chunked=True
    )
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 200
    for key in ("plain", "aws"):
        assert s3.get_object(Bucket="chunked", Key=key)["Body"].read() == data


def test_invoke_returns_the_handler_result(stack):
    lam = stack.client("lambda", config=_no_retry())
    resp, out = _invoke(lam, {"x": 1, "nested": {"y": [1, 2]}})
    assert resp["StatusCode"] == 200
    assert "FunctionError" not in resp
    assert resp["ExecutedVersion"] == "$LATEST"
    assert out["event"] == {"x": 1, "nested": {"y": [1, 2]}}
    assert isinstance(out["pid"], int)
    assert out["tmpdir"].startswith(str(stack.state_dir / "slots"))
    arn = "arn:aws:lambda:us-east-1:000000000000:function:whatever"
    for name in (arn, quote(arn, safe=""), "another-name"):
        _, out = _invoke(lam, {"name": name}, name=name)
        assert out["event"] == {"name": name}


def test_handler_exception_is_an_unhandled_function_error(stack):
    lam = stack.client("lambda", config=_no_retry())
    resp, out = _invoke(lam, {"crash": True})
    assert resp["StatusCode"] == 200
    assert resp["FunctionError"] == "Unhandled"
    assert out["errorType"] == "ValueError"
    assert "asked to crash" in out["errorMessage"]
    resp, out = _invoke(lam, {"crash": False})
    assert "FunctionError" not in resp
    assert out["event"] == {"crash": False}


def test_dead_emulator_answers_502_and_is_restarted(stack):
    from botocore.exceptions import ClientError

    lam = stack.client("lambda", config=_no_retry())
    with pytest.raises(ClientError) as err:
        _invoke(lam, {"kill_rie": True})
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 502
    _, out = _invoke(lam, {"after": "restart"})
    assert out["event"] == {"after": "restart"}
    assert sum(s["restarts"] for s in stack.router_status()["slots"]) == 1
    assert all(s["alive"] for s in stack.router_status()["slots"])


def _wait_execution(sfn, arn: str) -> dict:
    deadline = time.monotonic() + SFN_CAP_S
    while True:
        desc = sfn.describe_execution(executionArn=arn)
        if desc["status"] != "RUNNING":
            return desc
        if time.monotonic() > deadline:
            pytest.fail(f"execution {arn} still RUNNING after {SFN_CAP_S:.0f} s")
        time.sleep(0.1)


def test_step_functions_maps_invoke_the_real_handler(stack):
    role = stack.create_role("states-test-role")
    assert role.startswith("arn:aws:iam::") and role.endswith(":role/states-test-role")
    assert stack.create_role("states-test-role") == role  # idempotent
    sfn = stack.client("stepfunctions")
    task = {
        "Type": "Task",
        "Resource": "arn:aws:states:::lambda:invoke",
        "Parameters": {"FunctionName": "echo", "Payload.$": "$"},
        "OutputPath": "$.Payload",
        "End": True,
    }

    def machine(name: str, fan_out: dict) -> str:
        fan = {"Type": "Map", "MaxConcurrency": 2, "End": True, **fan_out}
        fan["ItemProcessor"]["StartAt"] = "Call"
        fan["ItemProcessor"]["States"] = {"Call": task}
        definition = {"StartAt": "Fan", "States": {"Fan": fan}}
        return sfn.create_state_machine(
            name=name, definition=json.dumps(definition), roleArn=role
        )["stateMachineArn"]

    inline = machine(
        "inline-map",
        {
            "ItemsPath": "$.items",
            "ItemProcessor": {"ProcessorConfig": {"Mode": "INLINE"}},
        },
    )
    s3 = stack.client("s3")
    s3.create_bucket(Bucket="manifests")
    items = [{"i": i} for i in range(4)]
    s3.put_object(Bucket="manifests", Key="items.json", Body=json.dumps(items).encode())
    distributed = machine(
        "distributed-map",
        {
            "ItemReader": {
                "Resource": "arn:aws:states:::s3:getObject",
                "ReaderConfig": {"InputType": "JSON"},
                "Parameters": {"Bucket": "manifests", "Key": "items.json"},
            },
            "ItemProcessor": {
                "ProcessorConfig": {"Mode": "DISTRIBUTED", "ExecutionType": "STANDARD"}
            },
        },
    )
    for arn in (inline, distributed):
        run = sfn.start_execution(
            stateMachineArn=arn, input=json.dumps({"items": items})
        )
        desc = _wait_execution(sfn, run["executionArn"])
        assert desc["status"] == "SUCCEEDED", desc
        out = json.loads(desc["output"])
        assert [o["event"] for o in out] == items
        assert all(isinstance(o["pid"], int) and o["request_id"] for o in out)


def test_timeout_is_sandbox_timedout_and_next_call_starts_cold(short_stack):
    lam = short_stack.client("lambda", config=_no_retry(read_timeout=30))
    _, first = _invoke(lam, {"sleep": 0})
    resp, out = _invoke(lam, {"sleep": 3})
    assert resp["FunctionError"] == "Unhandled"
    assert out["errorType"] == "Sandbox.Timedout"
    assert out["errorMessage"].endswith("Task timed out after 1.00 seconds")
    resp, out = _invoke(lam, {"sleep": 0})
    assert "FunctionError" not in resp
    assert out["cold"] is True
    assert out["pid"] != first["pid"]


def test_busy_slots_answer_429_without_queueing(short_stack):
    from botocore.exceptions import ClientError

    lam = short_stack.client("lambda", config=_no_retry(read_timeout=30))
    _invoke(lam, {"sleep": 0})  # warm
    gate = threading.Barrier(3)

    def call(_):
        gate.wait()
        try:
            return _invoke(lam, {"sleep": 0.6})[1]
        except ClientError as err:
            return err.response

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(call, range(3)))
    done = [r for r in results if "pid" in r]
    throttled = [r for r in results if "Error" in r]
    assert len(done) + len(throttled) == 3
    assert len(done) >= 1 and len(throttled) >= 1
    for r in throttled:
        assert r["Error"]["Code"] == "TooManyRequestsException"
        assert r["ResponseMetadata"]["HTTPStatusCode"] == 429
        assert r["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
    _, out = _invoke(lam, {"sleep": 0})
    assert out["pid"] == done[0]["pid"] and out["cold"] is False  # the RIE survived
    status = short_stack.router_status()
    assert status["throttled"] >= len(throttled)
    assert status["slots"][0]["restarts"] == 0


def test_cold_then_warm_and_stop_leaves_no_process(rie, tmp_path):
    stack = LocalAws.start(
        tmp_path / "aws", slots=2, handler="echo.echo", handler_dir=HANDLERS
    )
    try:
        assert (tmp_path / "aws" / "stack.json").is_file()
        for name in ("moto.log", "router.log", "slots/0/rie.log", "slots/1/rie.log"):
            assert (tmp_path / "aws" / name).is_file()
        lam = stack.client("lambda", config=_no_retry())
        _, first = _invoke(lam, {"n": 1})
        _, second = _invoke(lam, {"n": 2})
        assert (first["cold"], second["cold"]) == (True, False)
        assert first["pid"] == second["pid"]
        pids = stack.processes()
        assert (
            first["pid"] in pids and len(pids) == 5
        )  # moto, router, 2 RIEs, 1 runtime
    finally:
        stack.stop()
    assert stack.processes() == []
    assert not any(_alive(pid) for pid in pids)
    assert not (tmp_path / "aws" / "stack.json").exists()
    stack.stop()  # twice is harmless


def test_cli_runs_the_stack_in_the_background(rie, tmp_path):
    state = tmp_path / "cli"
    cli = [sys.executable, "-m", "cai.localaws"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*cli, *args, "--state", str(state)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    started = run(
        "start",
        "--slots",
        "1",
        "--handler",
        "echo.echo",
        "--handler-dir",
        str(HANDLERS),
    )
    assert started.returncode == 0, started.stderr
    try:
        info = json.loads((state / "stack.json").read_text())
        assert started.stdout.strip() == info["endpoint_url"]
        exports = run("env")
        assert exports.returncode == 0, exports.stderr
        env = dict(
            line.removeprefix("export ").split("=", 1)
            for line in exports.stdout.splitlines()
        )
        assert env["AWS_ENDPOINT_URL"] == info["endpoint_url"]
        assert env["AWS_ACCESS_KEY_ID"] == "testing"
        import boto3

        lam = boto3.client(
            "lambda",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            region_name=env["AWS_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            config=_no_retry(),
        )
        _, out = _invoke(lam, {"from": "cli"})
        assert out["event"] == {"from": "cli"}
        status = run("status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "router" in status.stdout and "slot 0" in status.stdout
        pids = LocalAws.attach(state).processes()
        assert out["pid"] in pids
    finally:
        stopped = run("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not any(_alive(pid) for pid in pids)
    with pytest.raises(CaiError, match="no local AWS stack"):
        LocalAws.attach(state)
    assert run("status").returncode == 2


def test_sixteen_slots_reach_100_invocations_per_second(rie, tmp_path):
    with LocalAws.start(
        tmp_path / "aws", slots=16, handler="echo.noop", handler_dir=HANDLERS
    ) as aws:
        lam = aws.client("lambda", config=_no_retry(max_pool_connections=16))

        def call(_):
            resp = lam.invoke(FunctionName="noop", Payload=b"{}")
            return resp.get("FunctionError"), resp["Payload"].read()

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(call, range(32)))  # every slot warm
            t0 = time.monotonic()
            results = list(pool.map(call, range(400)))
            rate = len(results) / (time.monotonic() - t0)
        assert results == [(None, b"{}")] * 400
        assert aws.router_status()["throttled"] == 0
    assert rate >= 100, f"{rate:.0f} invocations/s through the router"


def test_component_failure_names_its_log(tmp_path, monkeypatch):
    broken = tmp_path / "broken-rie"
    broken.write_text("#!/bin/sh\necho 'cannot start' >&2\nexit 3\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CAI_LAMBDA_RIE", str(broken))
    with pytest.raises(CaiError, match=r"router.*exited.*slot 0.*rie\.log") as err:
        LocalAws.start(
            tmp_path / "aws", slots=1, handler="echo.echo", handler_dir=HANDLERS
        )
    assert "router.log" in str(err.value)
    assert "cannot start" in (tmp_path / "aws" / "slots" / "0" / "rie.log").read_text()
    assert not (tmp_path / "aws" / "stack.json").exists()


def test_bad_arguments_are_config_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="slots=0"):
        LocalAws.start(tmp_path, slots=0, handler="echo.echo", handler_dir=HANDLERS)
    with pytest.raises(ConfigError, match="handler_dir"):
        LocalAws.start(tmp_path, handler="echo.echo", handler_dir=tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="missing_module"):
        LocalAws.start(tmp_path, handler="missing_module.fn", handler_dir=HANDLERS)
    monkeypatch.setenv("CAI_LAMBDA_RIE", str(tmp_path / "no-such-rie"))
    with pytest.raises(ConfigError, match="no-such-rie"):
        find_rie()


def test_install_rie_extracts_the_binary_from_the_wheel(tmp_path):
    arch = "arm64" if platform.machine().lower() in ("aarch64", "arm64") else "x86_64"
    wheel = tmp_path / "aws_sam_cli-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("samcli/__init__.py", "")
        zf.writestr(f"samcli/local/rapid/aws-lambda-rie-{arch}", b"\x7fELF fake")
    target = install_rie(tmp_path / "bin", wheel=wheel)
    assert target == tmp_path / "bin" / "aws-lambda-rie"
    assert target.read_bytes() == b"\x7fELF fake"
    assert os.access(target, os.X_OK)
    assert sorted(p.name for p in target.parent.iterdir()) == ["aws-lambda-rie"]

    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("samcli/__init__.py", "")
    with pytest.raises(CaiError, match="aws-lambda-rie-"):
        install_rie(tmp_path / "bin2", wheel=empty)
