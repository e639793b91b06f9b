"""The AWS backend of the workflow: stage to S3, fan out to Lambda, check what comes back.

Rule ``stage`` calls :func:`stage_run` (partitions, manifest and model to S3, skipping
what is already there); rule ``dispatch`` calls :func:`dispatch_run`: one invocation
per group of partitions of the plan (the plan's jobs), through boto3 with bounded
concurrency (:mod:`cai.dispatch`) or one Step Functions Distributed Map run
(:mod:`cai.stepfunctions`); invocations whose results already sit in S3 are skipped;
every result is downloaded and checked before the aggregate step sees it; the run's
Lambda and S3 cost comes from the billed records.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import boto3
import pandas as pd
from botocore.config import Config
from botocore.exceptions import ClientError

from cai import __version__
from cai.atomic import atomic_path, write_json
from cai.dispatch import InvocationError, RetryPolicy, dispatch, lambda_client
from cai.errors import ConfigError
from cai.model import ModelConfig, create_model, save_checkpoint
from cai.staging import (
    TRANSFER_THREADS,
    StagingError,
    ensure_bucket,
    fetch_results,
    read_receipt,
    result_keys,
    run_id,
    stage,
    staged_partitions,
)

_logger = logging.getLogger(__name__)

SFN_TRANSITIONS_PER_ITEM = 4  # child execution start and end, the task's enter, exit
SFN_TRANSITIONS_PER_RUN = 3  # the parent: start, the map state, end
RECORD_COLUMNS = [
    "invocation",
    "partitions",
    "rows",
    "status",
    "attempts",
    "requests",
    "retries",
    "throttles",
    "request_id",
    "cold",
    "started_at",
    "ended_at",
    "round_trip_ms",
    "duration_ms",
    "billed_ms",
    "memory_mb",
    "max_memory_mb",
    "init_ms",
    "report_source",
    "model_fetch_s",
    "model_load_s",
    "fetch_s",
    "compute_s",
    "upload_s",
    "error_kind",
    "error_type",
    "error",
]


def aws_session(aws: Mapping[str, Any]) -> boto3.session.Session:
    """A boto3 session in ``aws.region`` (or the environment's region)."""
    session = boto3.session.Session(region_name=aws.get("region") or None)
    if not session.region_name:
        raise ConfigError(
            "no AWS region: set aws.region in the config or AWS_REGION in the environment"
        )
    return session


def s3_client(session: boto3.session.Session, concurrency: int) -> Any:
    """An S3 client with a connection for each transfer thread (``concurrency`` files
    at once, each in up to :data:`TRANSFER_THREADS` parts)."""
    pool = concurrency * TRANSFER_THREADS + 4
    return session.client("s3", config=Config(max_pool_connections=pool))


def bucket_name(aws: Mapping[str, Any], session: boto3.session.Session) -> str:
    """``aws.bucket``, or ``cai-<account id>-<region>`` when it is null."""
    if aws.get("bucket"):
        return aws["bucket"]
    account = session.client("sts").get_caller_identity()["Account"]
    return f"cai-{account}-{session.region_name}"


def model_file(model: Mapping[str, Any], out_dir: str | os.PathLike) -> Path:
    """The model file to stage: the configured checkpoint, or the seeded weights saved
    as safetensors (so every Lambda predicts with exactly the local backend's weights,
    whatever its torch version's random numbers)."""
    if model.get("checkpoint"):
        return Path(model["checkpoint"])
    path = Path(out_dir) / (
        f"astromae-d{model['depth']}-h{model['num_heads']}-seed{model['seed']}"
        ".safetensors"
    )
    if not path.exists():
        config = ModelConfig(depth=model["depth"], num_heads=model["num_heads"])
        seeded, weights = create_model(config, None, model["seed"])
        # Stage jobs of several partition sizes may get here at once, and two saves
        # of the same weights differ in bytes (safetensors orders its metadata at
        # random): the first file in place wins, the others are dropped, so every
        # job hashes and uploads the same bytes.
        own = path.with_name(f".{path.name}.{os.getpid()}")
        save_checkpoint(seeded, own, {"weights": weights})
        try:
            os.link(own, path)
        except FileExistsError:
            pass
        finally:
            own.unlink()
    return path


def stage_run(
    manifest: str | os.PathLike,
    aws: Mapping[str, Any],
    model: Mapping[str, Any],
    receipt_path: str | os.PathLike,
) -> dict[str, Any]:
    """Stage a partition set and the model to S3 (see :mod:`cai.staging`)."""
    session = aws_session(aws)
    s3 = s3_client(session, aws["concurrency"])
    bucket = bucket_name(aws, session)
    ensure_bucket(s3, bucket, aws["create_bucket"], session.region_name)
    path = model_file(model, Path(receipt_path).parent)
    return stage(
        s3, bucket, aws["prefix"], manifest, path, receipt_path, aws["concurrency"]
    )


def plan_events(
    receipt: Mapping[str, Any],
    jobs: Sequence[Sequence[int]],
    logical: int,
    model: Mapping[str, Any],
    batch_size: int,
    backend: str,
    precision: str = "fp32",
    run_label: str = "",
) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    """The run's S3 prefix and one event per invocation (a job of the plan). Each run
    folder (``run_label``: data size, partition size, batch, repeat) has its own
    prefix, so every run, each repeat included, invokes the function itself."""
    identity = {
        "code": __version__,  # results of another CAI version are not reused
        "data": receipt["data_id"],
        "model": receipt["model"]["sha256"],
        "depth": model["depth"],
        "num_heads": model["num_heads"],
        "batch_size": batch_size,
        "precision": precision,
        "jobs": [[j[0], len(j)] for j in jobs],
        "logical": logical,
        "backend": backend,
        "run": run_label,
    }
    size = f"{float(receipt['partition_size_mb']):g}MB"
    run_prefix = "/".join(
        p
        for p in (
            receipt["prefix"].strip("/"),
            "runs",
            f"{backend}-{size}-b{batch_size}-{run_id(identity)}",
        )
        if p
    )
    events = []
    for number, indices in enumerate(jobs):
        events.append(
            (
                number,
                {
                    "invocation": number,
                    "bucket": receipt["bucket"],
                    "run_prefix": run_prefix,
                    "partitions": staged_partitions(receipt, indices, logical),
                    "model": {
                        "key": receipt["model"]["key"],
                        "sha256": receipt["model"]["sha256"],
                        "depth": model["depth"],
                        "num_heads": model["num_heads"],
                    },
                    "batch_size": batch_size,
                    "precision": precision,
                    "backend": backend,
                },
            )
        )
    return run_prefix, events


def finished_invocations(s3: Any, bucket: str, run_prefix: str) -> set[int]:
    """Invocations of a run whose predictions and metrics are both in S3."""
    keys = set()
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=f"{run_prefix}/results/"):
        keys.update(item["Key"] for item in page.get("Contents", []))
    done = set()
    for key in keys:
        match = re.fullmatch(r"inv-(\d+)\.json", key.rsplit("/", 1)[-1])
        if match and result_keys(run_prefix, int(match.group(1)))[0] in keys:
            done.add(int(match.group(1)))
    return done


def _flatten(record: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    summary = record.pop("summary", {}) or {}
    out = {key: record.get(key) for key in RECORD_COLUMNS}
    out["partitions"] = " ".join(p["id"] for p in event["partitions"])
    out["rows"] = sum(p["rows"] for p in event["partitions"])
    for key in ("model_fetch_s", "model_load_s", "fetch_s", "compute_s", "upload_s"):
        out[key] = summary.get(key)
    return out


def write_records(path: str | os.PathLike, records: Sequence[dict[str, Any]]) -> None:
    """The invocation records as a TSV, one row an invocation."""
    with atomic_path(path) as tmp:
        pd.DataFrame.from_records(records, columns=RECORD_COLUMNS).to_csv(
            tmp, sep="\t", index=False, float_format="%.6g"
        )


def _failure_message(failed: Sequence[dict[str, Any]], total: int) -> str:
    lines = [
        f"invocation {r['invocation']} ({r['partitions']}): {r['error_kind']} "
        f"{r['error_type']}"
        + (f" after {r['attempts']} attempts" if r["attempts"] is not None else "")
        + f": {r['error']}"
        for r in failed[:10]
    ]
    more = f"; and {len(failed) - 10} more" if len(failed) > 10 else ""
    return (
        f"{len(failed)} of {total} invocations failed; the others' results are kept "
        "in S3 and a rerun skips them: " + "; ".join(lines) + more
    )


def dispatch_run(
    receipt_path: str | os.PathLike,
    jobs: Sequence[Sequence[int]],
    logical: int,
    aws: Mapping[str, Any],
    model: Mapping[str, Any],
    batch_size: int,
    backend: str,
    prices: Mapping[str, Any],
    results_dir: str | os.PathLike,
    records_path: str | os.PathLike,
    summary_path: str | os.PathLike,
    failed_records_path: str | os.PathLike | None = None,
    definition_path: str | os.PathLike | None = None,
    precision: str = "fp32",
    run_label: str = "",
) -> dict[str, Any]:
    """Invoke the function for every unfinished invocation; fetch and check results.

    Outputs appear only when every invocation succeeded. On failure the records so far
    go to ``failed_records_path`` and the error lists the failed invocations with their
    partitions; finished results stay in S3 for the rerun.
    """
    from cai.cost import (
        Prices,
        lambda_cost,
        lambda_run_s3_requests,
        s3_cost,
        stepfunctions_cost,
    )

    started = time.time()
    wall = time.perf_counter()
    receipt = read_receipt(receipt_path)
    session = aws_session(aws)
    s3 = s3_client(session, aws["concurrency"])
    bucket = receipt["bucket"]
    try:
        s3.head_object(Bucket=bucket, Key=receipt["manifest_key"])
    except ClientError as err:
        if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
            raise
        raise StagingError(
            f"s3://{bucket}/{receipt['manifest_key']}: the staged manifest is gone "
            f"(receipt {receipt_path}); stage again: snakemake -R stage"
        ) from None
    run_prefix, events = plan_events(
        receipt, jobs, logical, model, batch_size, backend, precision, run_label
    )
    done = finished_invocations(s3, bucket, run_prefix)
    pending = [(n, e) for n, e in events if n not in done]
    _logger.info(
        "dispatch: %d invocations over %d partitions to s3://%s/%s: %d already done "
        "(skipped), %d to run on %s via %s",
        len(events),
        logical,
        bucket,
        run_prefix,
        len(done),
        len(pending),
        aws["function_name"],
        aws["orchestrator"],
    )
    if precision == "int8" and aws["architecture"] == "arm64":
        raise ConfigError(
            "inference.precision int8 needs PyTorch's x86 quantized kernels but "
            "aws.architecture is arm64; use bf16 or fp32, or an x86_64 function"
        )
    records: list[dict[str, Any]] = []
    if pending:
        if aws["orchestrator"] == "stepfunctions":
            from cai.stepfunctions import run_distributed_map

            if definition_path is None:
                raise ConfigError(
                    "aws.orchestrator is 'stepfunctions' but no state machine "
                    "definition was given (lambda/statemachine.asl.json)"
                )
            raw = run_distributed_map(
                session, aws, bucket, run_prefix, pending, definition_path
            )
        else:
            client = lambda_client(session, aws["timeout_s"], aws["concurrency"])
            policy = RetryPolicy(
                aws["max_attempts"],
                aws["backoff_base_s"],
                aws["backoff_cap_s"],
                aws["max_throttled_attempts"],
            )
            raw = dispatch(
                client, aws["function_name"], pending, aws["concurrency"], policy
            )
        by_number = dict(pending)
        records = [_flatten(r, by_number[r["invocation"]]) for r in raw]
    for number, event in events:
        if number in done:
            records.append(
                {
                    **dict.fromkeys(RECORD_COLUMNS),
                    "invocation": number,
                    "partitions": " ".join(p["id"] for p in event["partitions"]),
                    "rows": sum(p["rows"] for p in event["partitions"]),
                    "status": "skipped",
                    "attempts": 0,
                    "billed_ms": 0,
                }
            )
    records.sort(key=lambda r: r["invocation"])
    failed = [r for r in records if r["status"] == "failed"]
    if failed:
        if failed_records_path:
            write_records(failed_records_path, records)
        raise InvocationError(_failure_message(failed, len(records)))
    if failed_records_path:  # a report of an earlier failed attempt is out of date
        Path(failed_records_path).unlink(missing_ok=True)

    tick = time.perf_counter()
    fetched = fetch_results(
        s3,
        bucket,
        run_prefix,
        [(n, e["partitions"]) for n, e in events],
        results_dir,
        aws["concurrency"],
    )
    fetch_s = time.perf_counter() - tick
    write_records(records_path, records)

    ran = [r for r in records if r["status"] == "ok"]
    price = Prices.from_config(prices)
    lambda_usd = lambda_cost(
        [
            {
                "billed_ms": r["billed_ms"],
                "memory_mb": r["memory_mb"] or aws["memory_mb"],
                "requests": r["requests"],
            }
            for r in ran
        ],
        price,
        aws["architecture"],
        aws["ephemeral_mb"],
    )
    # S3 requests of this run, counted from what the handlers and this step do: per
    # invocation a HEAD and GET per partition and per cold model fetch, two PUTs;
    # per result fetched two HEADs and two GETs; LISTs (priced as PUTs) of 1,000
    # result keys each; the Step Functions item list.
    partitions_run = sum(len(r["partitions"].split()) for r in ran)
    colds = sum(bool(r["cold"]) for r in ran)
    # The longest cold start of the run: runtime init, then the model's fetch and load.
    cold_start_s = max(
        (
            (r["init_ms"] or 0) / 1000
            + (r["model_fetch_s"] or 0)
            + (r["model_load_s"] or 0)
            for r in ran
            if r["cold"]
        ),
        default=0.0,
    )
    puts, gets = lambda_run_s3_requests(partitions_run, colds, len(ran), len(events))
    stepfunctions = aws["orchestrator"] == "stepfunctions"
    s3_usd = s3_cost(puts=puts + stepfunctions, gets=gets, prices=price)
    sfn_usd = None
    if stepfunctions and ran:
        # Per item: the child execution's start, the task's enter and exit, its end.
        sfn_usd = stepfunctions_cost(
            SFN_TRANSITIONS_PER_ITEM * len(ran) + SFN_TRANSITIONS_PER_RUN, price
        )
    summary = {
        "backend": backend,
        "orchestrator": aws["orchestrator"],
        "function": aws["function_name"],
        "bucket": bucket,
        "run_prefix": run_prefix,
        "invocations": len(records),
        "invoked": len(ran),
        "skipped": len(done),
        # Step Functions retries inside the state machine: not counted per item.
        "attempts": None if stepfunctions else sum(r["attempts"] for r in ran),
        "retries": None if stepfunctions else sum(r["retries"] for r in ran),
        "throttled_attempts": None
        if stepfunctions
        else sum(r["throttles"] for r in ran),
        "cold_starts": colds,
        "cold_start_s": cold_start_s,
        # What ran: invocations in flight at most, and the function's memory size.
        "concurrency": aws["stepfunctions"]["max_concurrency"]
        if stepfunctions
        else aws["concurrency"],
        "memory_mb": max(
            (r["memory_mb"] for r in ran if r["memory_mb"]), default=aws["memory_mb"]
        ),
        "started_at": started,
        "dispatch_s": tick - wall,
        "fetch_s": fetch_s,
        "fetched_bytes": fetched,
        "invocations_per_s": len(ran) / (tick - wall) if ran else None,
        "billed_s": sum(r["billed_ms"] or 0 for r in ran) / 1000,
        "cost_usd": {
            "lambda": lambda_usd,
            "s3": s3_usd,
            "stepfunctions": sfn_usd,
            "total": lambda_usd["total_usd"]
            + s3_usd["total_usd"]
            + (sfn_usd["total_usd"] if sfn_usd else 0.0),
        },
        "cost_note": (
            "from this run's billed records (skipped invocations were billed in the "
            "run that made them); S3 requests counted from the steps' own calls"
            + (
                "; a lower bound with Step Functions: retries inside the state "
                "machine are not billed here"
                if stepfunctions
                else ""
            )
        ),
    }
    write_json(summary_path, summary)
    _logger.info(
        "dispatch: done in %.1f s (invoke %.1f s, fetch and check %.1f s, %.1f MiB): "
        "%d invoked, %d skipped, %s retries, %s throttled, %d cold; billed %.1f s, "
        "cost $%.4f (Lambda $%.4f, S3 $%.4f, Step Functions $%.4f)",
        time.perf_counter() - wall,
        tick - wall,
        fetch_s,
        fetched / (1 << 20),
        len(ran),
        len(done),
        summary["retries"],
        summary["throttled_attempts"],
        colds,
        summary["billed_s"],
        summary["cost_usd"]["total"],
        lambda_usd["total_usd"],
        s3_usd["total_usd"],
        sfn_usd["total_usd"] if sfn_usd else 0.0,
    )
    return summary


def deploy_from_config(aws: Mapping[str, Any], receipt_path: str | os.PathLike) -> dict:
    """Create or update the function as config ``aws`` describes; write a receipt."""
    from cai.aws_deploy import FunctionSpec, deploy_function

    for key in ("image_uri", "role_arn"):
        if not aws.get(key):
            raise ConfigError(
                f"aws.{key} is null; deploying the function needs it (see README, AWS)"
            )
    spec = FunctionSpec(
        name=aws["function_name"],
        image_uri=aws["image_uri"],
        role_arn=aws["role_arn"],
        memory_mb=aws["memory_mb"],
        timeout_s=aws["timeout_s"],
        ephemeral_mb=aws["ephemeral_mb"],
        architecture=aws["architecture"],
        description="CAI: AstroMAE redshift inference over staged partitions",
    )
    session = aws_session(aws)
    result = deploy_function(session.client("lambda"), spec)
    write_json(receipt_path, result.to_dict())
    return result.to_dict()
