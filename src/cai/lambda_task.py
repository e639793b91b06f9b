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

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3

from cai.atomic import sha256_file
from cai.engine import (
    InferenceSettings,
    LoadedModel,
    load_model,
    peak_rss_mb,
    run_inference,
)
from cai.errors import ConfigError
from cai.model import ModelConfig
from cai.staging import (
    CHECKSUM_METADATA,
    download_checked,
    partition_refs_from_event,
    result_keys,
)

_logger = logging.getLogger(__name__)

LAMBDA_PAYLOAD_MAX_BYTES = 6 * (1 << 20)  # synchronous response limit, 6 MB
LAMBDA_MB_PER_VCPU = 1769  # Lambda gives one vCPU per 1,769 MB of memory
LAMBDA_VCPU_MAX = 6  # ... up to 6 vCPUs at 10,240 MB
MODEL_DIR_ENV = "CAI_MODEL_DIR"  # folder of models baked into the image
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
    loaded = LoadedModel(
        cached.model, cached.weights, timings["model_load_s"], cached.config
    )
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
    request_id = getattr(context, "aws_request_id", None)
    settings = InferenceSettings(
        batch_size=int(event["batch_size"]),
        threads=lambda_vcpus(memory_mb),
        backend=event.get("backend", "lambda"),
        verify_checksum=False,  # checked on download below
        precision=event.get("precision", "fp32"),
    )
    tmp = Path(tempfile.gettempdir()) / "cai"
    model = _model(event, settings, tmp)

    part_dir = tmp / "partitions"
    part_dir.mkdir(parents=True, exist_ok=True)
    fetch_s = {}
    bucket = event["bucket"]
    for entry in event["partitions"]:
        local = part_dir / Path(entry["key"]).name
        part_tick = time.perf_counter()
        if not local.exists():  # a physical partition reused by several logical ones
            download_checked(s3, bucket, entry["key"], local, entry["sha256"])
        fetch_s[entry["id"]] = time.perf_counter() - part_tick
    refs = partition_refs_from_event(event["partitions"], part_dir)
    number = int(event["invocation"])
    pred_path = tmp / f"inv-{number:05d}.parquet"
    metrics_path = tmp / f"inv-{number:05d}.json"
    metrics = run_inference(
        refs, pred_path, metrics_path, settings, loaded=model["loaded"]
    )
    for record in metrics["partitions"]:
        record["fetch_s"] = fetch_s[record["partition"]]
        record["wall_s"] += record["fetch_s"]

    upload_tick = time.perf_counter()
    pred_key, metrics_key = result_keys(event["run_prefix"], number)
    pred_sha = metrics["job"]["predictions_sha256"]
    s3.upload_file(
        str(pred_path),
        bucket,
        pred_key,
        ExtraArgs={"Metadata": {CHECKSUM_METADATA: pred_sha}},
    )
    duration_ms = (time.perf_counter() - tick) * 1000
    metrics["job"]["lambda"] = {
        "request_id": request_id,
        "cold": cold,
        "init_s": init_s if cold else 0.0,
        "memory_limit_mb": memory_mb,
        "model_fetch_s": model["model_fetch_s"],
        "duration_ms": duration_ms,
    }
    body = (json.dumps(metrics, indent=2) + "\n").encode()
    s3.put_object(
        Bucket=bucket,
        Key=metrics_key,
        Body=body,
        ContentType="application/json",
        Metadata={CHECKSUM_METADATA: hashlib.sha256(body).hexdigest()},
    )
    upload_s = time.perf_counter() - upload_tick
    for entry in event["partitions"]:
        (part_dir / Path(entry["key"]).name).unlink(missing_ok=True)
    pred_path.unlink(missing_ok=True)
    metrics_path.unlink(missing_ok=True)

    records = metrics["partitions"]
    summary = {
        "invocation": number,
        "request_id": request_id,
        "cold": cold,
        "init_s": init_s if cold else 0.0,
        "partitions": [r["partition"] for r in records],
        "rows": metrics["job"]["rows"],
        "predictions_key": pred_key,
        "predictions_sha256": pred_sha,
        "metrics_key": metrics_key,
        "model_fetch_s": model["model_fetch_s"],
        "model_load_s": model["model_load_s"],
        "fetch_s": sum(fetch_s.values()),
        "read_s": sum(r["read_s"] for r in records),
        "compute_s": sum(r["compute_s"] for r in records),
        "upload_s": upload_s,
        "duration_ms": (time.perf_counter() - tick) * 1000,
        "memory_limit_mb": memory_mb,
        "max_memory_used_mb": peak_rss_mb(),
        "threads": metrics["job"]["threads"],
        "started_at": started,
        "ended_at": time.time(),
    }
    size = len(json.dumps(summary))
    if (
        size > LAMBDA_PAYLOAD_MAX_BYTES
    ):  # cannot happen for sane groups; say so if it does
        raise ConfigError(
            f"the invocation's summary is {size} B, over Lambda's "
            f"{LAMBDA_PAYLOAD_MAX_BYTES} B response limit: lower partitions_per_job"
        )
    _logger.info(
        "invocation %d (%s): %d partitions, %d galaxies, %s, model fetch %.2f s, load "
        "%.2f s, S3 fetch %.2f s, compute %.2f s, upload %.2f s, %.0f ms in all",
        number,
        request_id,
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


def configure_logging() -> None:
    """Log to stdout (CloudWatch) at INFO, once per container."""
    if not logging.getLogger("cai").handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        logging.getLogger("cai").addHandler(handler)
        logging.getLogger("cai").setLevel(os.environ.get("CAI_LOG_LEVEL", "INFO"))
