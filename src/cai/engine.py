"""The inference engine: partitions in, redshift predictions and timing records out.

One call handles one job: the model is loaded once, then each partition is verified
against its manifest checksum ("fetch"), read in batches (memory bounded by the batch,
not the partition), predicted and written. Every partition gets a record with the
fields the paper measures: fetch, model load, read, compute and write seconds, samples/s,
bits/s (image + magnitude bits over inference time, inference = read + compute) and
peak RSS.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import resource
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cai import __version__
from cai.atomic import atomic_path, sha256_file, write_json
from cai.errors import ChecksumError, ConfigError, DataFormatError
from cai.formats import INPUT_BITS_PER_GALAXY, GalaxyBatch, GalaxyFile, check_finite
from cai.model import ModelConfig, create_model
from cai.partition import PartitionRef
from cai.precision import check_precision, prepare_model, to_model_input

_logger = logging.getLogger(__name__)

PREDICTION_SCHEMA = pa.schema(
    [
        ("object_id", pa.int64()),
        ("z_pred", pa.float32()),
        ("z_true", pa.float32()),
        ("partition", pa.string()),
    ]
)
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class InferenceSettings:
    """How to run the model.

    Attributes:
        batch_size: Galaxies per forward pass.
        device: ``cpu`` or ``cuda``.
        threads: Torch intra-op threads (the cores given to the job).
        backend: Label of where this ran (``local``, ``slurm-cpu``, ...), kept in records.
        verify_checksum: Check each partition's sha256 against the manifest first.
        precision: ``fp32``, ``bf16`` or ``int8`` (see :mod:`cai.precision`).
    """

    batch_size: int = 512
    device: str = "cpu"
    threads: int = 1
    backend: str = "local"
    verify_checksum: bool = True
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.device not in DEVICES:
            raise ConfigError(f"device is {self.device!r}; expected one of {DEVICES}")
        if self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        check_precision(self.precision, self.device)


def usable_threads(requested: int) -> int:
    """Threads to give torch: what was asked, within the CPUs this process may use.

    A SLURM job may run on a node with more cores than it was given; SLURM's
    SLURM_CPUS_PER_TASK and the process's CPU affinity both bound the threads, so torch
    never oversubscribes the job's share.
    """
    limits = [requested, len(os.sched_getaffinity(0))]
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        limits.append(int(os.environ["SLURM_CPUS_PER_TASK"]))
    usable = max(1, min(limits))
    if usable < requested:
        _logger.warning(
            "%d threads asked for but this job may use %d CPUs: running %d threads "
            "(set inference.threads to the CPUs a job gets)",
            requested,
            min(limits[1:]),
            usable,
        )
    return usable


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def verify_partition(part: PartitionRef) -> None:
    """Raise unless the partition file's sha256 is the one its manifest records."""
    if not part.sha256:
        return
    try:
        actual = sha256_file(part.path)
    except FileNotFoundError:
        raise DataFormatError(f"{part.path}: no such file") from None
    if actual != part.sha256:
        raise ChecksumError(
            f"{part.path}: sha256 {actual} differs from the manifest's {part.sha256}; "
            "the partition is corrupt or was rewritten: rerun the partition step"
        )


def _predict_partition(
    model: torch.nn.Module,
    part: PartitionRef,
    settings: InferenceSettings,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """Read and predict one partition batch by batch; return ids, z_pred, z_true, times."""
    device = torch.device(settings.device)
    times = {"read_s": 0.0, "compute_s": 0.0}
    with GalaxyFile(part.path) as galaxies:
        if len(galaxies) != part.rows:
            raise DataFormatError(
                f"{part.path}: holds {len(galaxies)} rows; the manifest says {part.rows}"
            )
        object_id = np.empty(part.rows, dtype=np.int64)
        z_pred = np.empty(part.rows, dtype=np.float32)
        z_true = np.empty(part.rows, dtype=np.float32)
        starts = range(0, part.rows, settings.batch_size)

        def read(start: int) -> GalaxyBatch:
            batch = galaxies.read(start, start + settings.batch_size)
            check_finite(batch, part.path, first_row=start)
            return batch

        # One reader thread reads (and checks) the next batch while the model computes
        # this one: torch releases the GIL while it computes, so the read overlaps.
        # read_s is then what the model waited for its input (and the cast).
        with concurrent.futures.ThreadPoolExecutor(1) as reader:
            pending = reader.submit(read, starts[0])
            for number, start in enumerate(starts):
                tick = time.perf_counter()
                batch = pending.result()
                if number + 1 < len(starts):
                    pending = reader.submit(read, starts[number + 1])
                stop = start + len(batch)
                object_id[start:stop] = batch.object_id
                z_true[start:stop] = batch.redshift
                image, magnitudes = to_model_input(
                    torch.from_numpy(batch.image),
                    torch.from_numpy(batch.magnitudes),
                    settings.precision,
                )
                image = image.to(device, non_blocking=True)
                magnitudes = magnitudes.to(device, non_blocking=True)
                tock = time.perf_counter()
                times["read_s"] += tock - tick  # waiting for the reader, and casting
                z_pred[start:stop] = model(image, magnitudes).float().cpu().numpy()
                times["compute_s"] += time.perf_counter() - tock
    return object_id, z_pred, z_true, times


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to predict, with what it is and what loading it cost.

    Attributes:
        model: AstroMAE in eval mode, on the settings' device.
        weights: One-line description of the weights, kept in every record.
        load_s: Seconds the load took (0 for a model reused by a warm Lambda).
        config: The model's shape (depth, heads).
    """

    model: torch.nn.Module
    weights: str
    load_s: float
    config: ModelConfig


def load_model(
    settings: InferenceSettings,
    model_config: ModelConfig | None = None,
    checkpoint: str | os.PathLike | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Build AstroMAE on the settings' device, from a checkpoint or seeded weights."""
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "inference.device is 'cuda' but torch sees no CUDA device on "
            f"{socket.gethostname()}; use device: cpu or run on a GPU node"
        )
    tick = time.perf_counter()
    model, weights = create_model(model_config, checkpoint, seed)
    config = model.config
    model = prepare_model(model.to(settings.device), settings.precision)
    return LoadedModel(model, weights, time.perf_counter() - tick, config)


def process_start_time() -> float | None:
    """When this process started (Unix time), from /proc; None where there is none.
    A job's time then counts its interpreter start and imports (seconds for torch)."""
    try:
        with open("/proc/self/stat") as fh:
            # Field 22, after the parenthesised command name: start in clock ticks
            # since boot.
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def slurm_submit_time(job_id: str) -> float | None:
    """When SLURM job ``job_id`` was submitted (Unix time), from ``scontrol``; None,
    with a warning, when it cannot be asked (the run's end-to-end time then starts at
    the first job's start, without its queue wait)."""
    import datetime
    import subprocess

    try:
        shown = subprocess.run(
            ["scontrol", "show", "job", "--oneliner", job_id],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        stamp = next(
            f.split("=", 1)[1] for f in shown.split() if f.startswith("SubmitTime=")
        )
        return datetime.datetime.fromisoformat(stamp).timestamp()
    except (OSError, subprocess.SubprocessError, StopIteration, ValueError) as err:
        _logger.warning(
            "SLURM job %s: submit time unknown (%s): the run's end-to-end time will "
            "leave out its queue wait",
            job_id,
            err,
        )
        return None


def run_inference(
    partitions: Sequence[PartitionRef],
    predictions_path: str | os.PathLike,
    metrics_path: str | os.PathLike,
    settings: InferenceSettings,
    model_config: ModelConfig | None = None,
    checkpoint: str | os.PathLike | None = None,
    seed: int = 0,
    loaded: LoadedModel | None = None,
) -> dict[str, Any]:
    """Predict every partition; write a Parquet of predictions and a metrics JSON.

    The model is loaded here unless ``loaded`` gives one already in memory (a warm
    Lambda container keeps its model between invocations). Both outputs appear only
    when every partition succeeded (atomic writes); a failure names the partition and
    leaves no output behind.
    """
    job_started = time.time()
    wall_started = time.perf_counter()
    threads = usable_threads(settings.threads)
    torch.set_num_threads(threads)
    slurm_job = os.environ.get("SLURM_JOB_ID")
    if slurm_job and not settings.backend.startswith("slurm"):
        _logger.warning(
            "this job runs in SLURM job %s but its outputs are labelled %r: the "
            "comparison tables will file it under that backend; run with --profile "
            "profiles/slurm (or set inference.backend)",
            slurm_job,
            settings.backend,
        )
    if loaded is None:
        loaded = load_model(settings, model_config, checkpoint, seed)
    model, weights, model_load_s = loaded.model, loaded.weights, loaded.load_s
    _logger.info(
        "model: AstroMAE depth %d, %d heads, %s, %s, loaded in %.2f s on %s (%d threads)",
        loaded.config.depth,
        loaded.config.num_heads,
        weights,
        settings.precision,
        model_load_s,
        settings.device,
        threads,
    )
    host = socket.gethostname()
    records = []
    with (
        atomic_path(predictions_path) as tmp,
        pq.ParquetWriter(tmp, PREDICTION_SCHEMA) as out,
    ):
        for number, part in enumerate(partitions):
            started = time.time()
            tick = time.perf_counter()
            if settings.verify_checksum:
                verify_partition(part)
            fetch_s = time.perf_counter() - tick
            with torch.inference_mode():
                object_id, z_pred, z_true, times = _predict_partition(
                    model, part, settings
                )
            tick = time.perf_counter()
            table = pa.table(
                {
                    "object_id": object_id,
                    "z_pred": z_pred,
                    "z_true": z_true,
                    "partition": pa.array([part.id] * part.rows, pa.string()),
                },
                schema=PREDICTION_SCHEMA,
            )
            out.write_table(table)
            write_s = time.perf_counter() - tick
            inference_s = times["read_s"] + times["compute_s"]
            record = {
                "partition": part.id,
                "source_partition": part.source or part.id,
                "rows": part.rows,
                "backend": settings.backend,
                "fetch_s": fetch_s,
                "model_load_s": model_load_s if number == 0 else 0.0,
                **times,
                "write_s": write_s,
                "inference_s": inference_s,
                "wall_s": fetch_s
                + inference_s
                + write_s
                + (model_load_s if number == 0 else 0.0),
                "samples_per_s": part.rows / inference_s
                if inference_s
                else float("nan"),
                "bits_per_s": part.rows * INPUT_BITS_PER_GALAXY / inference_s
                if inference_s
                else float("nan"),
                "peak_rss_mb": peak_rss_mb(),
                "batch_size": settings.batch_size,
                "precision": settings.precision,
                "device": settings.device,
                "threads": threads,
                "host": host,
                "weights": weights,
                "started_at": started,
                "ended_at": time.time(),
            }
            records.append(record)
            _logger.info(
                "infer %s: %d galaxies, fetch %.2f s, read %.2f s, compute %.2f s, "
                "write %.2f s, %.1f galaxies/s, %.3g bit/s, peak RSS %.0f MiB",
                part.id,
                part.rows,
                fetch_s,
                times["read_s"],
                times["compute_s"],
                write_s,
                record["samples_per_s"],
                record["bits_per_s"],
                record["peak_rss_mb"],
            )
    metrics = {
        "tool": f"cai {__version__}",
        "job": {
            "backend": settings.backend,
            "host": host,
            "slurm_job_id": slurm_job,
            "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
            "submitted_at": slurm_submit_time(slurm_job) if slurm_job else None,
            "process_started_at": process_start_time(),
            "device": settings.device,
            "threads": threads,
            "batch_size": settings.batch_size,
            "precision": settings.precision,
            "weights": weights,
            "model_depth": loaded.config.depth,
            "model_num_heads": loaded.config.num_heads,
            "model_load_s": model_load_s,
            "partitions": len(records),
            "rows": sum(r["rows"] for r in records),
            "started_at": job_started,
            "ended_at": time.time(),
            "wall_s": time.perf_counter() - wall_started,
            "peak_rss_mb": peak_rss_mb(),
            "predictions": Path(predictions_path).name,
            "predictions_sha256": sha256_file(predictions_path),
        },
        "partitions": records,
    }
    write_json(metrics_path, metrics)
    return metrics
