"""Experiment figures from a small synthetic runs table: files, series labels, errors."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pandas as pd
import pytest

from cai.errors import DataFormatError
from cai.figures import (
    FIGURE_NAMES,
    REQUIRED_COLUMNS,
    _choose_setting,
    experiment_figures,
)
from cai.runs_schema import RUN_COLUMNS

GALAXY_BYTES = 20_504
BITS_PER_GB = 8 * 2**30
SMALL_GB = (0.01, 0.02, 0.04)
LARGE_GB = 128.0
MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF-"}

EXPECTED = {
    "time_vs_data_size": ["lambda", "local", "slurm-cpu"],
    "throughput_vs_batch_size": ["lambda", "local", "slurm-cpu"],
    "lambda_time_vs_data_size": ["1 MB", "2 MB"],
    "throughput_vs_data_size": [
        "1 MB",
        "1 MB (sum of rates)",
        "2 MB",
        "2 MB (sum of rates)",
    ],
    "invocations_vs_data_size": [
        "lambda 1 MB",
        "lambda 2 MB",
        "local 1 MB",
        "slurm-cpu 1 MB",
    ],
    # Below the 100 GiB extension the costs span less than 1.5 decades: a linear
    # axis, where local's $0 is drawn.
    "cost_vs_data_size": ["lambda", "local", "slurm-cpu"],
    "extension": ["lambda", "slurm-cpu"],
}


def _run(backend: str, data_gb: float, partition_mb: float, batch: int, repeat: int):
    """One row of every schema column, with plausible deterministic values."""
    kind = {"local": "local", "slurm-cpu": "slurm", "lambda": "lambda"}[backend]
    galaxies = round(data_gb * 2**30 / GALAXY_BYTES)
    partitions = max(1, round(data_gb * 1024 / partition_mb))
    speed = {"local": 2e-3, "slurm-cpu": 1e-3, "lambda": 2e-4}[backend] * 64 / batch
    end_to_end = 5.0 + galaxies * speed * (1 + 0.1 * repeat)
    partition_s = end_to_end / partitions
    bits = data_gb * BITS_PER_GB
    lambda_gb_s = partitions * partition_s * 3.0 if kind == "lambda" else 0.0
    core_hours = 4 * end_to_end / 3600 if kind == "slurm" else 0.0
    return {
        "experiment": "tiny",
        "run": f"{backend}/{data_gb:g}GB-{partition_mb:g}MB-b{batch}/r{repeat}",
        "backend": backend,
        "kind": kind,
        "device": "cpu",
        "precision": "fp32",
        "data_gb": data_gb,
        "galaxies": galaxies,
        "partition_mb": partition_mb,
        "batch_size": batch,
        "repeat": repeat,
        "partitions": partitions,
        "physical_partitions": min(partitions, 4),
        "storage_shared": partitions > 4,
        "invocations": partitions if kind == "lambda" else 1,
        "threads": 4,
        "slots": 2.0 if kind == "lambda" else float("nan"),
        "memory_mb": 3072.0 if kind == "lambda" else float("nan"),
        "cold_start_s": 0.0 if kind == "lambda" else float("nan"),
        "end_to_end_s": end_to_end,
        "partition_s_mean": partition_s,
        "partition_s_p50": partition_s,
        "partition_s_p95": 1.1 * partition_s,
        "partition_s_max": 1.2 * partition_s,
        "throughput_sum_bits_per_s": 3 * bits / end_to_end,
        "throughput_wall_bits_per_s": bits / end_to_end,
        "throughput_wall_samples_per_s": galaxies / end_to_end,
        "peak_rss_mb": 900.0,
        "core_hours": core_hours,
        "gpu_hours": 0.0,
        "lambda_gb_s": lambda_gb_s,
        "cost_usd": 1.7e-5 * lambda_gb_s + 0.05 * core_hours,
        "cost_basis": "synthetic",
    }


def synthetic_runs() -> pd.DataFrame:
    """local at 1 MB and small sizes; slurm-cpu at 1 MB, lambda at 1 and 2 MB, to 128 GiB."""
    settings = {
        "local": ((1.0,), SMALL_GB),
        "slurm-cpu": ((1.0,), (*SMALL_GB, LARGE_GB)),
        "lambda": ((1.0, 2.0), (*SMALL_GB, LARGE_GB)),
    }
    rows = [
        _run(backend, gb, mb, batch, repeat)
        for backend, (partitions, sizes) in settings.items()
        for mb, gb, batch, repeat in itertools.product(
            partitions, sizes, (32, 64), (1, 2)
        )
    ]
    frame = pd.DataFrame(rows)
    assert list(frame.columns) == list(RUN_COLUMNS)
    return frame


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("figures")
    return experiment_figures(synthetic_runs(), out), out


def test_required_columns_are_schema_columns() -> None:
    assert set(REQUIRED_COLUMNS) <= set(RUN_COLUMNS)


def test_every_figure_written_as_png_and_pdf(drawn: tuple[dict, Path]) -> None:
    _, out = drawn
    for name, fmt in itertools.product(FIGURE_NAMES, ("png", "pdf")):
        path = out / f"{name}.{fmt}"
        assert path.read_bytes().startswith(MAGIC[fmt]), path
    assert not list(out.glob(".*.tmp")), "temporary files left behind"


def test_series_labels_and_json(drawn: tuple[dict, Path]) -> None:
    labels, out = drawn
    assert list(labels) == list(FIGURE_NAMES)
    assert labels == EXPECTED
    assert json.loads((out / "figures.json").read_text()) == EXPECTED


def test_empty_extension_and_linear_cost(tmp_path: Path) -> None:
    runs = synthetic_runs()
    labels = experiment_figures(runs[runs["data_gb"] < 100], tmp_path, formats=("png",))
    assert labels["extension"] == []
    assert (tmp_path / "extension.png").read_bytes().startswith(MAGIC["png"])
    assert not (tmp_path / "extension.pdf").exists()
    # small sizes span under 1.5 decades of cost: linear axis, local's $0 is drawn
    assert labels["cost_vs_data_size"] == ["lambda", "local", "slurm-cpu"]
    assert json.loads((tmp_path / "figures.json").read_text()) == labels


def test_setting_prefers_most_data_sizes_at_largest_batch() -> None:
    runs = synthetic_runs()
    slurm = runs[runs["backend"] == "slurm-cpu"]
    extra = slurm[(slurm["data_gb"] == 0.01) & (slurm["batch_size"] == 64)]
    rows = pd.concat([slurm, extra.assign(partition_mb=0.5)])
    chosen, setting = _choose_setting(rows)
    assert set(chosen["partition_mb"]) == {1.0}
    assert set(chosen["batch_size"]) == {64}
    assert setting == "1 MB partitions, batch 64"
    # a tie in distinct data sizes goes to the smaller partition size
    tied = pd.concat([slurm, slurm.assign(partition_mb=4.0)])
    assert set(_choose_setting(tied)[0]["partition_mb"]) == {1.0}


def test_missing_column_names_it(tmp_path: Path) -> None:
    runs = synthetic_runs().drop(columns=["cost_usd", "invocations"])
    with pytest.raises(
        DataFormatError, match=r"invocations, cost_usd.*experiment_table"
    ):
        experiment_figures(runs, tmp_path)
    assert not list(tmp_path.iterdir())
