"""Unit tests of the fan-out logic: retry decisions, backoff, records, REPORT parsing.

The Lambda client here is a scripted stand-in (pure unit tests); the same code against
the real runtime is exercised in test_aws.py.
"""

from __future__ import annotations

import base64
import io
import json
import random
import threading

import pytest
from botocore.exceptions import ClientError, ReadTimeoutError

from cai.dispatch import RetryPolicy, dispatch, invoke_one, parse_report

REPORT = (
    "START RequestId: 8f5c Version: $LATEST\n"
    "END RequestId: 8f5c\n"
    "REPORT RequestId: 8f5c\tDuration: 6550.12 ms\tBilled Duration: 6551 ms\t"
    "Memory Size: 10240 MB\tMax Memory Used: 2800 MB\tInit Duration: 2034.55 ms\t\n"
)


def throttle() -> ClientError:
    return ClientError(
        {
            "Error": {"Code": "TooManyRequestsException", "Message": "Rate Exceeded."},
            "ResponseMetadata": {"HTTPStatusCode": 429},
        },
        "Invoke",
    )


def server_error() -> ClientError:
    return ClientError(
        {
            "Error": {"Code": "ServiceException", "Message": "internal"},
            "ResponseMetadata": {"HTTPStatusCode": 500},
        },
        "Invoke",
    )


def ok(summary: dict | None = None, log: str | None = None) -> dict:
    response = {
        "StatusCode": 200,
        "Payload": io.BytesIO(json.dumps(summary or {"duration_ms": 12.3}).encode()),
        "ResponseMetadata": {"HTTPHeaders": {"x-amzn-requestid": "req-1"}},
    }
    if log is not None:
        response["LogResult"] = base64.b64encode(log.encode()).decode()
    return response


def function_error(error_type: str, message: str) -> dict:
    body = {"errorType": error_type, "errorMessage": message}
    return {
        "StatusCode": 200,
        "FunctionError": "Unhandled",
        "Payload": io.BytesIO(json.dumps(body).encode()),
        "ResponseMetadata": {"HTTPHeaders": {}},
    }


class ScriptedClient:
    """Answers each invoke with the next scripted response or exception."""

    def __init__(self, script: list):
        self.script = list(script)
        self.calls = 0
        self.lock = threading.Lock()

    def invoke(self, **kwargs):
        with self.lock:
            self.calls += 1
            item = self.script.pop(0) if self.script else ok()
        if isinstance(item, Exception):
            raise item
        return item


def run(script: list, attempts: int = 4) -> tuple[dict, list[float], ScriptedClient]:
    client = ScriptedClient(script)
    waits: list[float] = []
    record = invoke_one(
        client,
        "fn",
        7,
        {"x": 1},
        RetryPolicy(attempts, 0.5, 4.0),
        random.Random(1),
        waits.append,
    )
    return record, waits, client


def test_parse_report_reads_every_billing_figure():
    figures = parse_report(REPORT)
    assert figures == {
        "duration_ms": 6550.12,
        "billed_ms": 6551.0,
        "memory_mb": 10240.0,
        "max_memory_mb": 2800.0,
        "init_ms": 2034.55,
    }
    assert "init_ms" not in parse_report(
        REPORT.replace("\tInit Duration: 2034.55 ms", "")
    )
    assert parse_report("no report here") == {}


def test_throttled_then_ok_counts_attempts_and_bills_only_what_ran():
    record, waits, client = run([throttle(), throttle(), ok(log=REPORT)])
    assert record["status"] == "ok"
    assert (record["attempts"], record["throttles"], record["retries"]) == (3, 2, 2)
    assert record["requests"] == 1  # throttled attempts never ran the function
    assert record["billed_ms"] == 6551
    assert record["report_source"] == "log"
    assert record["cold"] is True and record["init_ms"] == 2034.55
    assert record["request_id"] == "req-1"
    assert client.calls == 3
    assert len(waits) == 2
    assert 0 <= waits[0] <= 0.5 and 0 <= waits[1] <= 1.0  # full jitter within the cap


def test_throttles_have_a_budget_of_their_own():
    record, _, _ = run([throttle() for _ in range(6)] + [ok()], attempts=2)
    assert record["status"] == "ok" and record["throttles"] == 6
    client = ScriptedClient([throttle() for _ in range(5)])
    record = invoke_one(
        client, "fn", 1, {}, RetryPolicy(4, 0.0, 0.0, max_throttles=3), sleep=print
    )
    assert record["status"] == "failed" and record["error_kind"] == "throttled"
    assert record["throttles"] == 4 and client.calls == 4


def test_backoff_is_capped_and_jittered():
    policy = RetryPolicy(10, 0.5, 4.0)
    rng = random.Random(0)
    waits = [policy.backoff_s(retry, rng) for retry in range(1, 10) for _ in range(50)]
    assert max(waits) <= 4.0
    assert len({round(w, 6) for w in waits}) > 100  # spread out, not in step


def test_handler_crash_is_retried_then_reported():
    crashes = [function_error("RuntimeError", "boom on part-00001") for _ in range(3)]
    record, waits, _ = run(crashes, attempts=3)
    assert record["status"] == "failed"
    assert record["attempts"] == 3 and record["requests"] == 3
    assert record["error_kind"] == "function"
    assert record["error_type"] == "RuntimeError"
    assert "part-00001" in record["error"]
    assert len(waits) == 2
    assert record["billed_ms"] > 0  # failed attempts are billed too


def test_timeout_is_retried_and_named():
    def timeout():
        return function_error("Sandbox.Timedout", "Task timed out after 3.00 seconds")

    record, _, _ = run([timeout(), ok()])
    assert record["status"] == "ok" and record["attempts"] == 2
    record, _, _ = run([timeout(), timeout()], attempts=2)
    assert record["error_kind"] == "timeout"
    # Billed in full each time: one retry only, whatever max_attempts allows.
    record, _, client = run([timeout(), timeout(), timeout(), ok()], attempts=4)
    assert record["status"] == "failed" and record["attempts"] == 2
    assert client.calls == 2


def test_data_errors_are_not_retried():
    corrupt = function_error("ChecksumError", "s3://b/k: sha256 differs")
    record, waits, client = run([corrupt, ok()])
    assert record["status"] == "failed" and record["error_kind"] == "data"
    assert client.calls == 1 and waits == []


def test_service_and_network_errors_are_retried():
    network = ReadTimeoutError(endpoint_url="http://lambda")
    record, _, _ = run([server_error(), network, ok()])
    assert record["status"] == "ok" and record["attempts"] == 3
    assert record["throttles"] == 0


def test_client_errors_other_than_throttling_stop_at_once():
    missing = ClientError(
        {
            "Error": {"Code": "ResourceNotFoundException", "Message": "no function"},
            "ResponseMetadata": {"HTTPStatusCode": 404},
        },
        "Invoke",
    )
    record, waits, _ = run([missing])
    assert record["status"] == "failed" and record["error_kind"] == "client"
    assert record["error_type"] == "ResourceNotFoundException" and waits == []


def test_without_log_tail_the_handler_summary_bills():
    summary = {
        "duration_ms": 1500.2,
        "cold": False,
        "memory_limit_mb": 3008,
        "max_memory_used_mb": 900.5,
        "init_s": 0.0,
    }
    record, _, _ = run([ok(summary)])
    assert record["report_source"] == "handler"
    assert record["billed_ms"] == 1501
    assert record["memory_mb"] == 3008 and record["cold"] is False


def test_dispatch_keeps_order_and_one_record_per_event():
    client = ScriptedClient([throttle(), function_error("ChecksumError", "bad")])
    events = [(n, {"n": n}) for n in range(20)]
    records = dispatch(client, "fn", events, 4, RetryPolicy(3, 0.0, 0.0), seed=3)
    assert [r["invocation"] for r in records] == list(range(20))
    assert sum(r["status"] == "failed" for r in records) == 1
    assert sum(r["throttles"] for r in records) == 1
    with pytest.raises(ValueError, match="concurrency"):
        dispatch(client, "fn", events, 0, RetryPolicy())


def test_an_unforeseen_error_fails_one_invocation_not_the_run():
    class Broken(ScriptedClient):
        def invoke(self, **kwargs):
            if kwargs["Payload"] == b'{"n": 3}':
                raise KeyError("boom")
            return super().invoke(**kwargs)

    records = dispatch(
        Broken([]), "fn", [(n, {"n": n}) for n in range(6)], 3, RetryPolicy()
    )
    assert [r["status"] for r in records] == ["ok"] * 3 + ["failed"] + ["ok"] * 2
    assert records[3]["error_kind"] == "internal" and "KeyError" in records[3]["error"]
