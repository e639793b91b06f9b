"""The paper's orchestration: one Step Functions Distributed Map run over the invocations.

The item list (one invocation event per item) goes to S3; the state machine
(``lambda/statemachine.asl.json``, a template filled from config ``aws``) reads it with
an ``ItemReader``, invokes the function once per item with ``MaxConcurrency`` children
at a time, retries throttling and crashes itself, tolerates ``ToleratedFailurePercentage``
failures and writes its results with a ``ResultWriter``. This module creates or updates
the state machine, starts one execution, polls it to a terminal state (with a cap) and
then builds one record per invocation from what the handlers wrote to S3 (their metrics
carry request id, cold start and durations), naming every item that failed.

The map run's item counts are the verdict, not the execution's status: an emulated Step
Functions may report SUCCEEDED although items failed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from cai.errors import CaiError, ConfigError
from cai.staging import result_keys

_logger = logging.getLogger(__name__)

RESULT_READERS = 16  # metrics objects read at once after the run
EXPRESS_MAX_S = 300  # an EXPRESS child workflow runs 5 minutes at most
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED"})
ITEM_COUNT_KEYS = ("total", "succeeded", "failed", "timedOut", "aborted", "pending")


class StateMachineError(CaiError):
    """The state machine could not be created, started or did not finish in time."""


def render_definition(
    template_path: str | Path, function_arn: str, aws: Mapping[str, Any]
) -> str:
    """The ASL definition: the template with this run's function and limits."""
    sfn = aws["stepfunctions"]
    values = {
        "FunctionArn": function_arn,
        "ExecutionType": sfn["execution_type"],
        "MaxConcurrency": int(sfn["max_concurrency"]),
        "ToleratedFailurePercentage": float(sfn["tolerated_failure_percentage"]),
        "MaxAttempts": int(aws["max_attempts"]) - 1,  # ASL counts retries
        "MaxThrottledAttempts": int(aws["max_throttled_attempts"]),
        "BackoffCapSeconds": int(max(1, aws["backoff_cap_s"])),
    }
    text = Path(template_path).read_text()
    for name, value in values.items():
        text = text.replace("${" + name + "}", str(value))
    definition = json.loads(text)  # a template error shows here, not at AWS
    return json.dumps(definition)


def ensure_state_machine(sfn: Any, name: str, definition: str, role_arn: str) -> str:
    """Create the state machine, or update it when its definition or role changed."""
    arns = {
        m["name"]: m["stateMachineArn"]
        for page in sfn.get_paginator("list_state_machines").paginate()
        for m in page["stateMachines"]
    }
    if name not in arns:
        arn = sfn.create_state_machine(
            name=name, definition=definition, roleArn=role_arn, type="STANDARD"
        )["stateMachineArn"]
        _logger.info("stepfunctions: created state machine %s", arn)
        return arn
    arn = arns[name]
    live = sfn.describe_state_machine(stateMachineArn=arn)
    if json.loads(live["definition"]) != json.loads(definition) or (
        live["roleArn"] != role_arn
    ):
        sfn.update_state_machine(
            stateMachineArn=arn, definition=definition, roleArn=role_arn
        )
        _logger.info("stepfunctions: updated state machine %s", arn)
    return arn


def wait_for(
    sfn: Any, execution_arn: str, poll_s: float, max_wait_s: float
) -> dict[str, Any]:
    """Poll an execution until it reaches a terminal state; stop it past the cap."""
    deadline = time.monotonic() + max_wait_s
    while True:
        execution = sfn.describe_execution(executionArn=execution_arn)
        if execution["status"] in TERMINAL_STATES:
            return execution
        if time.monotonic() > deadline:
            sfn.stop_execution(executionArn=execution_arn, cause="cai: max_wait_s")
            raise StateMachineError(
                f"execution {execution_arn} still {execution['status']} after "
                f"{max_wait_s:g} s (aws.stepfunctions.max_wait_s): stopped it"
            )
        time.sleep(poll_s)


def map_run_counts(sfn: Any, execution_arn: str) -> dict[str, int]:
    """Item counts of the execution's map run (total, succeeded, failed, ...)."""
    runs = sfn.list_map_runs(executionArn=execution_arn)["mapRuns"]
    if not runs:
        raise StateMachineError(f"execution {execution_arn} started no map run")
    counts = sfn.describe_map_run(mapRunArn=runs[0]["mapRunArn"])["itemCounts"]
    return {key: int(counts.get(key, 0)) for key in ITEM_COUNT_KEYS}


def written_failures(s3: Any, output: Mapping[str, Any]) -> dict[int, str]:
    """Failed items the ResultWriter listed: invocation number -> error and cause."""
    details = output.get("ResultWriterDetails") or {}
    if not details.get("Key"):
        return {}
    bucket = details["Bucket"]
    manifest = json.loads(
        s3.get_object(Bucket=bucket, Key=details["Key"])["Body"].read()
    )
    failures = {}
    for entry in manifest.get("ResultFiles", {}).get("FAILED", []):
        items = json.loads(
            s3.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read()
        )
        for item in items:
            number = json.loads(item.get("Input", "{}")).get("invocation")
            if number is not None:
                failures[int(number)] = f"{item.get('Error')}: {item.get('Cause')}"
    return failures


def record_from_metrics(number: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """An invocation record from the metrics its handler wrote to S3."""
    job = metrics["job"]
    info = job.get("lambda", {})
    records = metrics["partitions"]
    duration = info.get("duration_ms")
    init_ms = 1000 * info.get("init_s", 0.0)
    return {
        "invocation": number,
        "status": "ok",
        "attempts": None,  # retried inside the state machine: not counted per item
        "requests": 1,
        "retries": None,
        "throttles": None,
        "request_id": info.get("request_id"),
        "cold": info.get("cold"),
        "started_at": job["started_at"],
        "ended_at": job["ended_at"],
        "round_trip_ms": None,
        "duration_ms": duration,
        # Billed like the boto3 path's handler figures: rounded up to the millisecond,
        # a container image's init included.
        "billed_ms": float(math.ceil(duration + init_ms))
        if duration is not None
        else None,
        "memory_mb": info.get("memory_limit_mb"),
        "max_memory_mb": job.get("peak_rss_mb"),
        "init_ms": init_ms,
        "report_source": "handler",
        "summary": {
            "model_fetch_s": info.get("model_fetch_s"),
            "model_load_s": job.get("model_load_s"),
            "fetch_s": sum(r["fetch_s"] for r in records),
            "compute_s": sum(r["compute_s"] for r in records),
            "upload_s": None,
        },
    }


def run_distributed_map(
    session: Any,
    aws: Mapping[str, Any],
    bucket: str,
    run_prefix: str,
    pending: Sequence[tuple[int, dict[str, Any]]],
    template_path: str | Path,
) -> list[dict[str, Any]]:
    """Run the pending invocations as one Distributed Map; one record per invocation."""
    sfn_config = aws["stepfunctions"]
    if sfn_config["execution_type"] == "EXPRESS" and aws["timeout_s"] > EXPRESS_MAX_S:
        raise ConfigError(
            f"aws.stepfunctions.execution_type EXPRESS runs a child for at most "
            f"{EXPRESS_MAX_S} s but aws.timeout_s is {aws['timeout_s']}; lower it or "
            "use STANDARD"
        )
    if not sfn_config["role_arn"]:
        raise ConfigError(
            "aws.orchestrator is 'stepfunctions' but aws.stepfunctions.role_arn is "
            "null; give the ARN of a role Step Functions may assume"
        )
    s3 = session.client("s3")
    sfn = session.client("stepfunctions")
    identity = session.client("sts").get_caller_identity()
    partition = identity["Arn"].split(":")[1]  # aws, aws-cn, aws-us-gov
    function_arn = (
        f"arn:{partition}:lambda:{session.region_name}:{identity['Account']}:"
        f"function:{aws['function_name']}"
    )
    definition = render_definition(template_path, function_arn, aws)
    try:
        machine = ensure_state_machine(
            sfn, sfn_config["state_machine_name"], definition, sfn_config["role_arn"]
        )
    except ClientError as err:
        raise StateMachineError(
            f"state machine {sfn_config['state_machine_name']}: {err}; check "
            "states:CreateStateMachine, states:UpdateStateMachine and iam:PassRole"
        ) from None
    items_key = f"{run_prefix}/sfn/items.json"
    s3.put_object(
        Bucket=bucket,
        Key=items_key,
        Body=json.dumps([event for _, event in pending]).encode(),
        ContentType="application/json",
    )
    started = time.perf_counter()
    execution_arn = sfn.start_execution(
        stateMachineArn=machine,
        input=json.dumps(
            {
                "bucket": bucket,
                "items_key": items_key,
                "results_prefix": f"{run_prefix}/sfn/output",
            }
        ),
    )["executionArn"]
    _logger.info(
        "stepfunctions: started %s over %d items (max concurrency %d)",
        execution_arn,
        len(pending),
        sfn_config["max_concurrency"],
    )
    try:
        execution = wait_for(
            sfn, execution_arn, sfn_config["poll_s"], sfn_config["max_wait_s"]
        )
    except BaseException:
        # Cancelled here (SIGTERM, Ctrl-C): stop the run in AWS too, or it goes on.
        with contextlib.suppress(ClientError):
            sfn.stop_execution(executionArn=execution_arn, cause="cai: cancelled")
        raise
    counts = map_run_counts(sfn, execution_arn)
    output = json.loads(execution.get("output") or "{}")
    failures = written_failures(s3, output if isinstance(output, dict) else {})
    _logger.info(
        "stepfunctions: execution %s in %.1f s; map run items: %s",
        execution["status"],
        time.perf_counter() - started,
        ", ".join(f"{k} {v}" for k, v in counts.items()),
    )

    def metrics_of(number: int) -> dict[str, Any] | None:
        key = result_keys(run_prefix, number)[1]
        try:
            return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        except ClientError as err:
            if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise

    with concurrent.futures.ThreadPoolExecutor(RESULT_READERS) as pool:
        found = list(pool.map(metrics_of, [number for number, _ in pending]))
    records = []
    for (number, _), metrics in zip(pending, found, strict=True):
        if metrics is not None:
            records.append(record_from_metrics(number, metrics))
            continue
        records.append(
            {
                "invocation": number,
                "status": "failed",
                "attempts": None,
                "requests": 1,
                "retries": None,
                "throttles": None,
                "billed_ms": 0.0,
                "error_kind": "stepfunctions",
                "error_type": "ItemFailed",
                "error": failures.get(
                    number,
                    f"no result at s3://{bucket}/{result_keys(run_prefix, number)[1]}; "
                    f"the map run counted {counts['failed']} failed and "
                    f"{counts['timedOut']} timed-out items (execution {execution_arn}, "
                    f"{execution['status']})",
                ),
            }
        )
    failed = sum(r["status"] == "failed" for r in records)
    if failed != counts["failed"] + counts["timedOut"] + counts["aborted"]:
        _logger.warning(
            "stepfunctions: %d invocations have no result in S3 but the map run "
            "counts %d failed, %d timed out, %d aborted items; the results in S3 "
            "decide, check the execution's history",
            failed,
            counts["failed"],
            counts["timedOut"],
            counts["aborted"],
        )
    return records
