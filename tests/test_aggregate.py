"""Tests of joining inference jobs into a catalogue, partition table and run summary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from cai.aggregate import PARTITION_COLUMNS, aggregate, read_summary
from cai.engine import InferenceSettings, PartitionRef, run_inference
from cai.errors import DataFormatError
from cai.model import ModelConfig
from cai.partition import MANIFEST_NAME, partition_dataset, read_manifest
from cai.sky import simulate

TINY = ModelConfig(depth=1, num_heads=8)  # the full depth-12 model is slow on CPU
ROWS = 20
SIZE_MB = 0.17  # floor((0.17 MiB - 4 KiB) / 20,504 B) = 8 rows: partitions 8, 8, 4


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict:
    """Three partitions predicted by two jobs: parts 0-1, then part 2 (read-only)."""
    folder = tmp_path_factory.mktemp("aggregate-data")
    source = folder / "galaxies.h5"
    simulate(source, ROWS, seed=17, first_object_id=1)
    partition_dataset(source, folder / "parts", SIZE_MB)
    refs = [
        PartitionRef.from_manifest(e)
        for e in read_manifest(folder / "parts")["partitions"]
    ]
    threads = torch.get_num_threads()
    predictions, metrics = [], []
    for number, job_refs in enumerate((refs[:2], refs[2:])):
        predictions.append(folder / f"job{number}" / "predictions.parquet")
        metrics.append(folder / f"job{number}" / "metrics.json")
        run_inference(
            job_refs,
            predictions[-1],
            metrics[-1],
            InferenceSettings(batch_size=6, backend="unit-test"),
            model_config=TINY,
            seed=1,
        )
    torch.set_num_threads(threads)
    return {
        "manifest": folder / "parts" / MANIFEST_NAME,
        "predictions": predictions,
        "metrics": metrics,
    }


def outputs(folder: Path) -> dict[str, Path]:
    return {
        "catalogue_out": folder / "catalogue.parquet",
        "partitions_out": folder / "partitions.tsv",
        "summary_out": folder / "summary.json",
    }


def run(jobs: dict, folder: Path, predictions=None, metrics=None) -> dict:
    return aggregate(
        predictions if predictions is not None else jobs["predictions"],
        metrics if metrics is not None else jobs["metrics"],
        jobs["manifest"],
        **outputs(folder),
    )


def copy_job(jobs: dict, number: int, folder: Path) -> tuple[Path, Path]:
    """A copy of one job's predictions and metrics, free to alter."""
    folder.mkdir(parents=True)
    pred = Path(shutil.copy(jobs["predictions"][number], folder))
    metrics = Path(shutil.copy(jobs["metrics"][number], folder))
    return pred, metrics


def assert_no_output(folder: Path) -> None:
    assert not folder.exists() or list(folder.iterdir()) == []


# --------------------------------------------------------------------------------------
# Joining
# --------------------------------------------------------------------------------------


def test_catalogue_joins_every_job_in_order(jobs, tmp_path: Path) -> None:
    run(jobs, tmp_path)
    catalogue = pq.read_table(tmp_path / "catalogue.parquet")
    assert catalogue.num_rows == ROWS
    np.testing.assert_array_equal(
        catalogue["object_id"].to_numpy(), np.arange(1, ROWS + 1)
    )
    parts = pa.concat_tables(pq.read_table(p) for p in jobs["predictions"])
    assert catalogue.equals(parts)
    assert catalogue.column_names == ["object_id", "z_pred", "z_true", "partition"]


def test_partition_table_has_one_row_per_partition(jobs, tmp_path: Path) -> None:
    run(jobs, tmp_path)
    table = pd.read_csv(tmp_path / "partitions.tsv", sep="\t")
    assert list(table.columns) == PARTITION_COLUMNS
    assert list(table["partition"]) == ["part-00000", "part-00001", "part-00002"]
    assert list(table["rows"]) == [8, 8, 4]
    assert (table["backend"] == "unit-test").all()
    assert (table["weights"] == "untrained weights (seed 1)").all()
    assert (table["batch_size"] == 6).all()
    records = [
        r for m in jobs["metrics"] for r in json.loads(m.read_text())["partitions"]
    ]
    np.testing.assert_allclose(
        table["bits_per_s"], [r["bits_per_s"] for r in records], rtol=1e-5
    )


def test_summary_throughput_is_consistent(jobs, tmp_path: Path) -> None:
    summary = run(jobs, tmp_path)
    assert read_summary(tmp_path / "summary.json") == summary
    job_records = [json.loads(m.read_text())["job"] for m in jobs["metrics"]]
    records = [
        r for m in jobs["metrics"] for r in json.loads(m.read_text())["partitions"]
    ]

    assert summary["rows"] == ROWS
    assert summary["partitions"] == 3
    assert summary["jobs"] == 2
    assert summary["backend"] == "unit-test"
    assert summary["weights"] == "untrained weights (seed 1)"
    assert summary["batch_size"] == 6
    assert summary["device"] == "cpu"
    assert summary["partition_size_mb"] == SIZE_MB
    assert summary["input_bits"] == ROWS * 164_000

    # From the first job's process start (here the test's own process) or start.
    end_to_end = max(j["ended_at"] for j in job_records) - min(
        min(j["started_at"], j["process_started_at"] or j["started_at"])
        for j in job_records
    )
    assert summary["end_to_end_s"] == pytest.approx(end_to_end)
    assert summary["end_to_end_s"] > 0
    assert summary["throughput_bits_per_s"] == pytest.approx(
        ROWS * 164_000 / summary["end_to_end_s"]
    )
    assert summary["throughput_samples_per_s"] == pytest.approx(
        ROWS / summary["end_to_end_s"]
    )
    assert summary["sum_of_partition_bits_per_s"] == pytest.approx(
        sum(r["bits_per_s"] for r in records)
    )
    assert summary["sum_of_partition_samples_per_s"] == pytest.approx(
        sum(r["samples_per_s"] for r in records)
    )
    walls = [r["wall_s"] for r in records]
    assert summary["partition_seconds"]["max"] == pytest.approx(max(walls))
    assert summary["partition_seconds"]["mean"] == pytest.approx(np.mean(walls))
    assert summary["compute_s"] == pytest.approx(sum(r["compute_s"] for r in records))
    assert summary["peak_rss_mb"] == pytest.approx(
        max(r["peak_rss_mb"] for r in records)
    )


def test_job_order_does_not_matter_for_the_summary(jobs, tmp_path: Path) -> None:
    forward = run(jobs, tmp_path / "a")
    backward = run(
        jobs, tmp_path / "b", jobs["predictions"][::-1], jobs["metrics"][::-1]
    )
    for key in ("rows", "partitions", "end_to_end_s", "throughput_bits_per_s"):
        assert forward[key] == backward[key]


# --------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------


def test_altered_predictions_are_refused(jobs, tmp_path: Path) -> None:
    pred, metrics = copy_job(jobs, 0, tmp_path / "job0")
    table = pq.read_table(pred)
    z_pred = pc.add(table["z_pred"], pa.scalar(0.5, pa.float32()))
    pq.write_table(table.set_column(1, "z_pred", z_pred), pred)
    out = tmp_path / "agg"
    with pytest.raises(DataFormatError, match="sha256") as info:
        run(jobs, out, [pred, jobs["predictions"][1]], [metrics, jobs["metrics"][1]])
    message = str(info.value)
    assert message.startswith(f"{pred}: sha256")
    assert str(metrics) in message
    assert_no_output(out)


def test_a_missing_partition_is_refused(jobs, tmp_path: Path) -> None:
    out = tmp_path / "agg"
    with pytest.raises(
        DataFormatError, match="have no predictions: part-00002"
    ) as info:
        run(jobs, out, jobs["predictions"][:1], jobs["metrics"][:1])
    assert str(jobs["manifest"]) in str(info.value)
    assert_no_output(out)


def test_a_partition_predicted_twice_is_refused(jobs, tmp_path: Path) -> None:
    out = tmp_path / "agg"
    with pytest.raises(
        DataFormatError, match="partition part-00000 was predicted by more than one job"
    ):
        run(
            jobs,
            out,
            [*jobs["predictions"], jobs["predictions"][0]],
            [*jobs["metrics"], jobs["metrics"][0]],
        )
    assert_no_output(out)


def test_rows_differing_from_the_manifest_are_refused(jobs, tmp_path: Path) -> None:
    pred, metrics = copy_job(jobs, 1, tmp_path / "job1")
    record = json.loads(metrics.read_text())
    record["partitions"][0]["rows"] = 3
    metrics.write_text(json.dumps(record))
    out = tmp_path / "agg"
    with pytest.raises(DataFormatError, match="part-00002: 3 rows predicted"):
        run(jobs, out, [jobs["predictions"][0], pred], [jobs["metrics"][0], metrics])
    assert_no_output(out)


def test_predictions_rows_differing_from_metrics_are_refused(
    jobs, tmp_path: Path
) -> None:
    pred, metrics = copy_job(jobs, 1, tmp_path / "job1")
    record = json.loads(metrics.read_text())
    record["job"]["rows"] = 5
    metrics.write_text(json.dumps(record))
    out = tmp_path / "agg"
    with pytest.raises(DataFormatError, match="4 rows;") as info:
        run(jobs, out, [jobs["predictions"][0], pred], [jobs["metrics"][0], metrics])
    assert str(pred) in str(info.value)
    assert_no_output(out)


def test_unreadable_metrics_are_refused(jobs, tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    not_json = folder / "not.json"
    not_json.write_text("{oops")
    not_record = folder / "record.json"
    not_record.write_text(json.dumps({"tool": "cai"}))
    out = tmp_path / "agg"
    for path, expected in ((not_json, "not readable JSON"), (not_record, "'job'")):
        with pytest.raises(DataFormatError, match=expected) as info:
            run(jobs, out, jobs["predictions"], [path, jobs["metrics"][1]])
        assert str(path) in str(info.value)
    assert_no_output(out)


def test_different_numbers_of_predictions_and_metrics_are_refused(
    jobs, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="2 predictions files but 1 metrics files"):
        run(jobs, tmp_path / "agg", jobs["predictions"], jobs["metrics"][:1])


def test_a_missing_manifest_is_refused(jobs, tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="manifest not found"):
        aggregate(
            jobs["predictions"],
            jobs["metrics"],
            tmp_path / "nowhere" / MANIFEST_NAME,
            **outputs(tmp_path / "agg"),
        )
    assert_no_output(tmp_path / "agg")
