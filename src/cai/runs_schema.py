"""Columns of the experiment's tidy table of runs (one row per run).

Written by :mod:`cai.experiment` (rule ``experiment_table``) as CSV and Parquet; read by
:mod:`cai.figures` and :mod:`cai.planner`. Units are in the names: ``_s`` seconds,
``_gb`` GiB (2^30 B), ``_mb`` MiB (2^20 B), ``_usd`` US dollars.
"""

from __future__ import annotations

# name -> (dtype, meaning)
RUN_COLUMNS: dict[str, tuple[str, str]] = {
    "experiment": ("str", "experiment name (config experiment.name)"),
    "run": ("str", "run folder under results/, e.g. local/1GB-25MB-b512/r1"),
    "backend": ("str", "backend name: local, slurm-cpu, slurm-gpu, lambda, ..."),
    "kind": ("str", "where inference ran: local, slurm or lambda"),
    "device": ("str", "cpu or cuda"),
    "precision": ("str", "fp32, bf16 or int8"),
    "data_gb": ("float", "data size predicted, GiB of 20,504-B galaxies"),
    "galaxies": ("int", "galaxies predicted"),
    "partition_mb": ("float", "partition size, MiB"),
    "batch_size": ("int", "galaxies per forward pass"),
    "repeat": ("int", "repeat number, 1-based"),
    "partitions": ("int", "partitions predicted (logical)"),
    "physical_partitions": ("int", "partition files stored"),
    "storage_shared": ("bool", "partitions beyond the stored data reread stored files"),
    "invocations": ("int", "Lambda invocations, or inference jobs (local, SLURM)"),
    "threads": ("int", "CPU threads per inference job or invocation"),
    "slots": (
        "float",
        "Lambda: invocations the dispatcher kept in flight at most (NaN for other "
        "backends, whose parallelism the scheduler decides)",
    ),
    "memory_mb": ("float", "Lambda memory size, MB (NaN for other backends)"),
    "cold_start_s": (
        "float",
        "Lambda: longest cold start of the run (init, model fetch and load), 0 when "
        "every invocation was warm (NaN for other backends)",
    ),
    "end_to_end_s": ("float", "first submission to last result, seconds"),
    "partition_s_mean": ("float", "per-partition wall seconds, mean"),
    "partition_s_p50": ("float", "per-partition wall seconds, median"),
    "partition_s_p95": ("float", "per-partition wall seconds, 95th percentile"),
    "partition_s_max": ("float", "per-partition wall seconds, max"),
    "throughput_sum_bits_per_s": (
        "float",
        "the paper's aggregate: sum over partitions of bits over own inference time",
    ),
    "throughput_wall_bits_per_s": ("float", "all input bits over end_to_end_s"),
    "throughput_wall_samples_per_s": ("float", "galaxies over end_to_end_s"),
    "peak_rss_mb": ("float", "largest peak resident memory of a job, MiB"),
    "core_hours": ("float", "CPU cores x hours held by inference jobs (SLURM, local)"),
    "gpu_hours": ("float", "GPUs x hours held by inference jobs (SLURM GPU)"),
    "lambda_gb_s": ("float", "billed Lambda GB-seconds"),
    "cost_usd": ("float", "cost of the run at config prices, USD"),
    "cost_basis": ("str", "what cost_usd counts, in words"),
}
