"""One Lambda invocation: staged partitions from S3 in, predictions and metrics to S3.

The container's handler (``lambda/handler.py``) only passes the event here. A container
serves many invocations one after another: the first (cold) one downloads the model
from S3 into the container's ``/tmp`` and loads it; later (warm) ones reuse both. Each
invocation downloads its partitions into ``/tmp`` (checked against their sha256),
predicts them with :func:`cai.engine.run_inference`, uploads the predictions and then
the metrics (the metrics' presence marks the invocation done), deletes the partitions
and returns a summary far below the 6 MB response limit.

The event (built by :mod:`cai.lambda_run`; also one item of the Step Functions map):

    {"invocation": 3, "bucket": "...", "run_prefix": "cai/runs/<run-id>",
     "partitions": [{"id", "key", "rows", "sha256", "source"}, ...],
     "model": {"key", "sha256", "depth", "num_heads"},
     "batch_size": 512, "precision": "fp32", "backend": "lambda"}
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3

from cai.atomic import sha256_file
from cai.engine import (
    InferenceSettings,
    load_model,
    peak_rss_mb,
    run_inference,
)
from cai.errors import ConfigError
from cai.model import ModelConfig
from cai.staging import (
    CHECKSUM_METADATA,
    download_checked,
    local_name,
    partition_refs_from_event,
    result_keys,
)

_logger = logging.getLogger(__name__)

LAMBDA_MB_PER_VCPU = 1769  # Lambda gives one vCPU per 1,769 MB of memory
LAMBDA_VCPU_MAX = 6  # ... up to 6 vCPUs at 10,240 MB
MODEL_DIR_ENV = "CAI_MODEL_DIR"  # folder of models baked into the image
PARTITION_KEYS = ("id", "key", "rows", "sha256")
MODEL_KEYS = ("key", "sha256", "depth", "num_heads")
EVENT_KEYS = ("invocation", "bucket", "run_prefix", "partitions", "model", "batch_size")

# State of this container, kept across warm invocations.
_container: dict[str, Any] = {"cold": True, "models": {}, "s3": None}


def lambda_vcpus(memory_mb: int) -> int:
    """vCPUs Lambda gives a function of ``memory_mb`` MB (proportional, 1 to 6)."""
    return max(1, min(LAMBDA_VCPU_MAX, math.ceil(memory_mb / LAMBDA_MB_PER_VCPU)))


def _check_event(event: Any) -> None:
    if not isinstance(event, dict):
        raise ConfigError(f"event is a {type(event).__name__}; expected a JSON object")
    missing = [key for key in EVENT_KEYS if key not in event]
    if missing:
        raise ConfigError(
            f"event has no {', '.join(missing)}; expected the keys {', '.join(EVENT_KEYS)}"
        )
    if not event["partitions"]:
        raise ConfigError("event lists no partitions")
    for where, entry, keys in [
        *(
            (f"partitions[{n}]", p, PARTITION_KEYS)
            for n, p in enumerate(event["partitions"])
        ),
        ("model", event["model"], MODEL_KEYS),
    ]:
        missing = [key for key in keys if key not in entry]
        if missing:
            raise ConfigError(
                f"event {where} of invocation {event['invocation']} has no "
                f"{', '.join(missing)}; expected {', '.join(keys)}"
            )


def _model(event: dict[str, Any], settings: InferenceSettings, tmp: Path) -> dict:
    """The event's model, from this container's memory, its /tmp, or S3 (in that order)."""
    spec = event["model"]
    timings = {"model_fetch_s": 0.0, "model_load_s": 0.0}
    cache_key = (spec["sha256"], settings.precision)
    cached = _container["models"].get(cache_key)
    if cached is None:
        # Files are named by their sha256: one baked into the image (CAI_MODEL_DIR, see
        # lambda/Dockerfile) or fetched by an earlier invocation of this container.
        name = Path(spec["key"]).name
        baked = Path(os.environ.get(MODEL_DIR_ENV, "/nonexistent")) / name
        path = baked if baked.exists() else tmp / "models" / name
        if not path.exists() or sha256_file(path) != spec["sha256"]:
            path.parent.mkdir(parents=True, exist_ok=True)
            tick = time.perf_counter()
            download_checked(
                _container["s3"], event["bucket"], spec["key"], path, spec["sha256"]
            )
            timings["model_fetch_s"] = time.perf_counter() - tick
        config = ModelConfig(depth=spec["depth"], num_heads=spec["num_heads"])
        cached = load_model(settings, config, path)
        _container["models"] = {cache_key: cached}  # one model per container
        timings["model_load_s"] = cached.load_s
    loaded = dataclasses.replace(cached, load_s=timings["model_load_s"])
    return {"loaded": loaded, **timings}


def handle(event: Any, context: Any, init_s: float = 0.0) -> dict[str, Any]:
    """Run one invocation; return its summary (raises on any failure)."""
    started = time.time()
    tick = time.perf_counter()
    _check_event(event)
    cold = _container["cold"]
    _container["cold"] = False
    if _container["s3"] is None:
        _container["s3"] = boto3.client("s3")
    s3 = _container["s3"]
    memory_mb = int(getattr(context, "memory_limit_in_mb", 0) or LAMBDA_MB_PER_VCPU)
    info = {
        "request_id": getattr(context, "aws_request_id", None),
        "cold": cold,
        "init_s": init_s if cold else 0.0,
        "memory_limit_mb": memory_mb,
    }
    settings = InferenceSettings(
        batch_size=int(event["batch_size"]),
        threads=lambda_vcpus(memory_mb),
        backend=event.get("backend", "lambda"),
        verify_checksum=False,  # checked on download
        precision=event.get("precision", "fp32"),
    )
    tmp = Path(tempfile.gettempdir()) / "cai"
    model = _model(event, settings, tmp)
    info["model_fetch_s"] = model["model_fetch_s"]

    number = int(event["invocation"])
    part_dir = tmp / "partitions"
    pred_path = tmp / f"inv-{number:05d}.parquet"
    metrics_path = tmp / f"inv-{number:05d}.json"
    # /tmp outlives the invocation: whatever happens, leave only the model behind.
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, part_dir, ignore_errors=True)
        cleanup.callback(pred_path.unlink, missing_ok=True)
        cleanup.callback(metrics_path.unlink, missing_ok=True)
        fetch_s = _fetch_partitions(s3, event, part_dir)
        metrics = run_inference(
            partition_refs_from_event(event["partitions"], part_dir),
            pred_path,
            metrics_path,
            settings,
            loaded=model["loaded"],
        )
        # A warm execution environment started long before this invocation: the
        # run's time starts at the invocation (the dispatcher times it end to end).
        metrics["job"]["process_started_at"] = None
        for record in metrics["partitions"]:
            record["fetch_s"] = fetch_s[record["partition"]]
            record["wall_s"] += record["fetch_s"]
        upload_tick = time.perf_counter()
        info["duration_ms"] = (upload_tick - tick) * 1000  # until the upload
        keys = _upload_results(s3, event, pred_path, metrics, info)
        upload_s = time.perf_counter() - upload_tick

    records = metrics["partitions"]
    summary = {
        "invocation": number,
        **info,
        "partitions": [r["partition"] for r in records],
        "rows": metrics["job"]["rows"],
        **keys,
        "predictions_sha256": metrics["job"]["predictions_sha256"],
        "model_load_s": model["model_load_s"],
        "fetch_s": sum(fetch_s.values()),
        "read_s": sum(r["read_s"] for r in records),
        "compute_s": sum(r["compute_s"] for r in records),
        "upload_s": upload_s,
        "duration_ms": (time.perf_counter() - tick) * 1000,
        "max_memory_used_mb": peak_rss_mb(),
        "threads": metrics["job"]["threads"],
        "started_at": started,
        "ended_at": time.time(),
    }
    _logger.info(
        "invocation %d (%s): %d partitions, %d galaxies, %s, model fetch %.2f s, load "
        "%.2f s, S3 fetch %.2f s, compute %.2f s, upload %.2f s, %.0f ms in all",
        number,
        info["request_id"],
        len(records),
        summary["rows"],
        "cold" if cold else "warm",
        summary["model_fetch_s"],
        summary["model_load_s"],
        summary["fetch_s"],
        summary["compute_s"],
        upload_s,
        summary["duration_ms"],
    )
    return summary


def _fetch_partitions(s3: Any, event: dict[str, Any], part_dir: Path) -> dict:
    """Download (and check) the event's partitions; seconds per logical partition."""
    part_dir.mkdir(parents=True, exist_ok=True)
    fetch_s = {}
    for entry in event["partitions"]:
        local = part_dir / local_name(entry)
        part_tick = time.perf_counter()
        if not local.exists():  # a physical partition reused by several logical ones
            download_checked(s3, event["bucket"], entry["key"], local, entry["sha256"])
        fetch_s[entry["id"]] = time.perf_counter() - part_tick
    return fetch_s


def _upload_results(
    s3: Any,
    event: dict[str, Any],
    pred_path: Path,
    metrics: dict[str, Any],
    info: dict[str, Any],
) -> dict[str, str]:
    """Predictions, then metrics with the invocation's figures in ``job.lambda`` (their
    presence marks the invocation done); returns both keys."""
    bucket = event["bucket"]
    pred_key, metrics_key = result_keys(event["run_prefix"], int(event["invocation"]))
    s3.upload_file(
        str(pred_path),
        bucket,
        pred_key,
        ExtraArgs={
            "Metadata": {CHECKSUM_METADATA: metrics["job"]["predictions_sha256"]}
        },
    )
    metrics["job"]["lambda"] = info
    body = (json.dumps(metrics, indent=2) + "\n").encode()
    s3.put_object(
        Bucket=bucket,
        Key=metrics_key,
        Body=body,
        ContentType="application/json",
        Metadata={CHECKSUM_METADATA: hashlib.sha256(body).hexdigest()},
    )
    return {"predictions_key": pred_key, "metrics_key": metrics_key}


def configure_logging() -> None:
    """Log to stdout (CloudWatch) at INFO, once per container. The runtime has its own
    root handler: the package's records stop at ours, so each line appears once."""
    log = logging.getLogger("cai")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        log.addHandler(handler)
        log.propagate = False
        log.setLevel(os.environ.get("CAI_LOG_LEVEL", "INFO"))
