"""S3 staging for the AWS backend: partitions, manifest and model up, results down.

Key layout under ``s3://<bucket>/<prefix>/`` (``aws.bucket``, ``aws.prefix``):

    data/<data-id>/<size>MB/manifest.json     the manifest, each partition with its key
    data/<data-id>/<size>MB/part-00000.h5     one object per stored partition
    models/<sha256>.<ext>                     a model file, named by its checksum
    runs/<run-id>/results/inv-00000.parquet   predictions of one invocation
    runs/<run-id>/results/inv-00000.json      its metrics, written last: present = done
    runs/<run-id>/sfn/items.json              the Distributed Map's item list
    runs/<run-id>/sfn/output/...              the Distributed Map's ResultWriter output

``<data-id>`` is the first 16 hex digits of the sha256 over the partitions' checksums,
so the same data staged twice lands on the same keys (and is skipped), and other data
never overwrites it. ``<run-id>`` hashes everything that decides the predictions (data,
model, batch size, model shape, the grouping of partitions into invocations): a rerun
of the same run finds its finished results, a changed run starts afresh.

Every object carries its sha256 as user metadata (``x-amz-meta-sha256``): staging
skips objects whose checksum already matches, and results are checked against it.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from cai.atomic import atomic_path, sha256_file, write_json
from cai.errors import CaiError, ChecksumError, DataFormatError
from cai.partition import PartitionRef, read_manifest

_logger = logging.getLogger(__name__)

MIB = 1 << 20
MULTIPART_CHUNK_BYTES = 16 * MIB  # S3 allows 5 MiB..5 GiB parts; 16 MiB: few requests
TRANSFER_THREADS = 4  # parts of one multipart upload in flight at once
CHECKSUM_METADATA = "sha256"  # x-amz-meta-sha256 on every object CAI writes
RESULTS = "results"


class StagingError(CaiError):
    """An S3 object is missing, unreadable or differs from what was staged."""


def data_id(manifest: dict[str, Any]) -> str:
    """Content id of a partitioned data set: its partitions' checksums, hashed."""
    digest = hashlib.sha256()
    for entry in manifest["partitions"]:
        digest.update(f"{entry['id']}:{entry['sha256']}\n".encode())
    return digest.hexdigest()[:16]


def run_id(identity: dict[str, Any]) -> str:
    """Id of a run's results prefix: everything that decides its predictions, hashed."""
    text = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def result_keys(run_prefix: str, invocation: int) -> tuple[str, str]:
    """S3 keys of one invocation's predictions and metrics."""
    stem = f"{run_prefix}/{RESULTS}/inv-{invocation:05d}"
    return f"{stem}.parquet", f"{stem}.json"


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def ensure_bucket(s3: Any, bucket: str, create: bool, region: str) -> None:
    """Check that ``bucket`` exists and is ours to use; create it if asked to."""
    try:
        s3.head_bucket(Bucket=bucket)
        return
    except ClientError as err:
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 403:
            raise StagingError(
                f"bucket {bucket!r} exists but this account may not use it (403); "
                "set aws.bucket to a bucket of yours"
            ) from None
        if status != 404:
            raise
    if not create:
        raise StagingError(
            f"bucket {bucket!r} does not exist; create it or set aws.create_bucket: true"
        )
    extra = {}
    if region != "us-east-1":  # us-east-1 refuses an explicit LocationConstraint
        extra["CreateBucketConfiguration"] = {"LocationConstraint": region}
    s3.create_bucket(Bucket=bucket, **extra)
    _logger.info("stage: created bucket %s in %s", bucket, region)


def _status(err: ClientError) -> int:
    return err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)


def _remote_sha256(s3: Any, bucket: str, key: str) -> str | None:
    """The sha256 an object was staged with, or None when there is no such object."""
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return None
        raise
    return head.get("Metadata", {}).get(CHECKSUM_METADATA)


def put_requests(size: int) -> int:
    """S3 requests one upload of ``size`` bytes costs: one PUT, or a multipart upload
    (create, one per part, complete)."""
    if size < MULTIPART_CHUNK_BYTES:
        return 1
    return math.ceil(size / MULTIPART_CHUNK_BYTES) + 2


@dataclass(frozen=True)
class Upload:
    """One local file to stage."""

    path: str
    key: str
    sha256: str
    bytes: int


def upload_files(
    s3: Any, bucket: str, uploads: Sequence[Upload], concurrency: int
) -> dict[str, int]:
    """Upload files in parallel (multipart when large), skipping objects whose staged
    checksum already matches. Returns counts: uploaded, skipped, bytes, requests."""
    config = TransferConfig(
        multipart_threshold=MULTIPART_CHUNK_BYTES,
        multipart_chunksize=MULTIPART_CHUNK_BYTES,
        max_concurrency=TRANSFER_THREADS,
    )

    def one(item: Upload) -> tuple[bool, int]:
        if _remote_sha256(s3, bucket, item.key) == item.sha256:
            return False, 1
        s3.upload_file(
            item.path,
            bucket,
            item.key,
            ExtraArgs={"Metadata": {CHECKSUM_METADATA: item.sha256}},
            Config=config,
        )
        return True, 1 + put_requests(item.bytes)

    counts = {"uploaded": 0, "skipped": 0, "bytes": 0, "requests": 0}
    with concurrent.futures.ThreadPoolExecutor(max(1, concurrency)) as pool:
        for item, (uploaded, requests) in zip(
            uploads, pool.map(one, uploads), strict=True
        ):
            counts["requests"] += requests
            if uploaded:
                counts["uploaded"] += 1
                counts["bytes"] += item.bytes
            else:
                counts["skipped"] += 1
    return counts


def stage(
    s3: Any,
    bucket: str,
    prefix: str,
    manifest_path: str | os.PathLike,
    model_path: str | os.PathLike,
    receipt_path: str | os.PathLike,
    concurrency: int = 8,
) -> dict[str, Any]:
    """Upload a partitioned data set, its manifest and a model file; write a receipt.

    The receipt (JSON) lists every key with its checksum; dispatch builds its events
    from it, so nothing is listed in S3 at dispatch time.
    """
    started = time.perf_counter()
    manifest = read_manifest(manifest_path)
    size_label = f"{float(manifest['partition_size_mb']):g}MB"
    data_prefix = _join(prefix, "data", data_id(manifest), size_label)
    uploads, partitions = [], []
    for entry in manifest["partitions"]:
        key = _join(data_prefix, Path(entry["path"]).name)
        uploads.append(Upload(entry["path"], key, entry["sha256"], int(entry["bytes"])))
        partitions.append(
            {
                "id": entry["id"],
                "key": key,
                "rows": int(entry["rows"]),
                "sha256": entry["sha256"],
                "bytes": int(entry["bytes"]),
            }
        )
    model_sha = sha256_file(model_path)
    model_key = _join(prefix, "models", model_sha + Path(model_path).suffix)
    uploads.append(
        Upload(str(model_path), model_key, model_sha, os.path.getsize(model_path))
    )
    counts = upload_files(s3, bucket, uploads, concurrency)

    remote_manifest = {
        key: value for key, value in manifest.items() if key != "partitions"
    }
    remote_manifest["partitions"] = partitions
    body = (json.dumps(remote_manifest, indent=2) + "\n").encode()
    manifest_key = _join(data_prefix, "manifest.json")
    body_sha = hashlib.sha256(body).hexdigest()
    if _remote_sha256(s3, bucket, manifest_key) != body_sha:
        s3.put_object(
            Bucket=bucket,
            Key=manifest_key,
            Body=body,
            ContentType="application/json",
            Metadata={CHECKSUM_METADATA: body_sha},
        )
        counts["requests"] += 1
    receipt = {
        "bucket": bucket,
        "prefix": prefix,
        "data_id": data_id(manifest),
        "manifest_key": manifest_key,
        "partition_size_mb": manifest["partition_size_mb"],
        "partitions": partitions,
        "model": {
            "key": model_key,
            "sha256": model_sha,
            "bytes": os.path.getsize(model_path),
        },
        "uploaded": counts["uploaded"],
        "skipped": counts["skipped"],
        "uploaded_bytes": counts["bytes"],
        "s3_requests": counts["requests"],
        "seconds": time.perf_counter() - started,
    }
    write_json(receipt_path, receipt)
    _logger.info(
        "stage: %d objects to s3://%s/%s: %d uploaded (%.1f MiB), %d already there "
        "(checksum matches), %d S3 requests, %.1f s",
        len(uploads),
        bucket,
        data_prefix,
        counts["uploaded"],
        counts["bytes"] / MIB,
        counts["skipped"],
        counts["requests"],
        receipt["seconds"],
    )
    return receipt


def read_receipt(path: str | os.PathLike) -> dict[str, Any]:
    """A staging receipt written by :func:`stage`."""
    try:
        receipt = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataFormatError(
            f"{path}: not a readable staging receipt ({err})"
        ) from None
    for key in ("bucket", "partitions", "model", "manifest_key"):
        if key not in receipt:
            raise DataFormatError(f"{path}: staging receipt has no {key!r}")
    return receipt


def staged_partitions(
    receipt: dict[str, Any], indices: Sequence[int], logical: int
) -> list[dict[str, Any]]:
    """Event entries of logical partitions ``indices`` (cyclic reuse past the stored
    ones, as :func:`cai.partition.planned_partitions`)."""
    entries = receipt["partitions"]
    shared = logical > len(entries)
    out = []
    for index in indices:
        entry = entries[index % len(entries)]
        out.append(
            {
                "id": f"part-{index:05d}",
                "key": entry["key"],
                "rows": entry["rows"],
                "sha256": entry["sha256"],
                "source": entry["id"] if shared else None,
            }
        )
    return out


def download_checked(
    s3: Any, bucket: str, key: str, dest: str | os.PathLike, sha256: str | None = None
) -> None:
    """Download one object; check it against ``sha256`` (or its staged checksum).

    ``dest`` appears only when the check passed (written under a temporary name).
    """
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if _status(err) not in (403, 404):
            raise  # throttling, 5xx: not the object's fault, worth a retry
        code = err.response.get("Error", {}).get("Code")
        raise StagingError(f"s3://{bucket}/{key}: cannot be read ({code})") from None
    expected = sha256 or head.get("Metadata", {}).get(CHECKSUM_METADATA)
    with atomic_path(dest) as tmp:
        s3.download_file(bucket, key, str(tmp))
        actual = sha256_file(tmp)
        if expected and actual != expected:
            raise ChecksumError(
                f"s3://{bucket}/{key}: sha256 {actual} differs from {expected}; the "
                "object is corrupt or was overwritten: delete it and rerun"
            )


def fetch_results(
    s3: Any,
    bucket: str,
    run_prefix: str,
    invocations: Sequence[tuple[int, Sequence[dict[str, Any]]]],
    out_dir: str | os.PathLike,
    concurrency: int = 8,
) -> int:
    """Download every invocation's predictions and metrics into ``out_dir``, checked.

    Each metrics record must list exactly the invocation's planned partitions with
    their row counts, and the predictions must match the metrics' checksum and rows.
    ``out_dir`` appears (by rename) only when every result passed; it holds
    ``job-NNNNN.parquet`` and ``job-NNNNN.json`` as the aggregate step reads them.
    Returns the bytes downloaded.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))

    def one(item: tuple[int, Sequence[dict[str, Any]]]) -> int:
        number, parts = item
        pred_key, metrics_key = result_keys(run_prefix, number)
        metrics_path = tmp / f"job-{number:05d}.json"
        pred_path = tmp / f"job-{number:05d}.parquet"
        download_checked(s3, bucket, metrics_key, metrics_path)
        try:
            metrics = json.loads(metrics_path.read_text())
            job = metrics["job"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataFormatError(
                f"s3://{bucket}/{metrics_key}: not an inference metrics record"
            ) from None
        download_checked(s3, bucket, pred_key, pred_path, job["predictions_sha256"])
        planned = [(p["id"], p["rows"]) for p in parts]
        recorded = [(r["partition"], r["rows"]) for r in metrics["partitions"]]
        rows = pq.read_metadata(pred_path).num_rows
        if recorded != planned or rows != sum(n for _, n in planned):
            raise DataFormatError(
                f"s3://{bucket}/{pred_key}: holds {rows} rows of partitions "
                f"{[p for p, _ in recorded]}; invocation {number} was planned for "
                f"{sum(n for _, n in planned)} rows of {[p for p, _ in planned]}"
            )
        return pred_path.stat().st_size + metrics_path.stat().st_size

    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, concurrency)) as pool:
            total = sum(pool.map(one, invocations))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return total


def local_name(entry: dict[str, Any]) -> str:
    """File name of a staged partition once downloaded: its checksum, so that copies of
    other data sets or of a rewritten object can never be mistaken for it."""
    return entry["sha256"] + Path(entry["key"]).suffix


def partition_refs_from_event(
    entries: Sequence[dict[str, Any]], local_dir: str | os.PathLike
) -> list[PartitionRef]:
    """Engine partition refs for event entries whose objects sit in ``local_dir``."""
    return [
        PartitionRef(
            e["id"],
            str(Path(local_dir) / local_name(e)),
            int(e["rows"]),
            e.get("sha256"),
            e.get("source"),
        )
        for e in entries
    ]
