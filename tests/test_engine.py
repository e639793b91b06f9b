"""Tests of the inference engine on a tiny model: outputs, records and failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cai.atomic import sha256_file
from cai.engine import (
    PREDICTION_SCHEMA,
    InferenceSettings,
    PartitionRef,
    run_inference,
)
from cai.errors import ChecksumError, ConfigError, DataFormatError
from cai.formats import INPUT_BITS_PER_GALAXY, GalaxyFile, GalaxyWriter
from cai.model import ModelConfig, create_model
from cai.partition import partition_dataset, read_manifest
from cai.sky import simulate

TINY = ModelConfig(depth=1, num_heads=8)  # the full depth-12 model is slow on CPU
ROWS = 20
SIZE_MB = 0.17  # floor((0.17 MiB - 4 KiB) / 20,504 B) = 8 rows: partitions 8, 8, 4
SEED = 3
RECORD_FIELDS = {
    "partition",
    "rows",
    "fetch_s",
    "model_load_s",
    "read_s",
    "compute_s",
    "write_s",
    "inference_s",
    "wall_s",
    "samples_per_s",
    "bits_per_s",
    "peak_rss_mb",
    "batch_size",
    "device",
    "threads",
    "host",
    "backend",
    "weights",
    "started_at",
    "ended_at",
}
JOB_FIELDS = {
    "backend",
    "host",
    "device",
    "threads",
    "batch_size",
    "weights",
    "model_depth",
    "model_num_heads",
    "model_load_s",
    "partitions",
    "rows",
    "started_at",
    "ended_at",
    "wall_s",
    "peak_rss_mb",
    "predictions",
    "predictions_sha256",
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """A 20-galaxy source file and its three partitions (read-only for the tests)."""
    folder = tmp_path_factory.mktemp("engine-data")
    source = folder / "galaxies.h5"
    simulate(source, ROWS, seed=11, first_object_id=500)
    partition_dataset(source, folder / "parts", SIZE_MB)
    manifest = read_manifest(folder / "parts")
    with GalaxyFile(source) as galaxies:
        batch = galaxies.read(0, ROWS)
    return {
        "source": source,
        "refs": [PartitionRef.from_manifest(e) for e in manifest["partitions"]],
        "batch": batch,
    }


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """run_inference sets torch's thread count; put it back after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(refs, out: Path, **settings) -> dict:
    settings.setdefault("batch_size", 7)
    return run_inference(
        refs,
        out / "predictions.parquet",
        out / "metrics.json",
        InferenceSettings(**settings),
        model_config=TINY,
        seed=SEED,
    )


def copy_partition(ref: PartitionRef, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(ref.path, folder / name))


def write_with_nan_pixel(source: PartitionRef, path: Path, row: int) -> PartitionRef:
    """A copy of a partition with one NaN pixel, with a matching checksum."""
    with GalaxyFile(source.path) as galaxies:
        batch = galaxies.read(0, len(galaxies))
    batch.image[row, 3, 7, 9] = np.nan
    with GalaxyWriter(path, len(batch), {"tool": "test"}) as writer:
        writer.append(batch)
    return PartitionRef(source.id, str(path), source.rows, sha256_file(path))


def assert_no_output(out: Path) -> None:
    """Neither output file, nor a temporary file, is left in the output folder."""
    assert not out.exists() or list(out.iterdir()) == []


# --------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------


def test_predictions_have_ids_true_redshifts_and_rows(dataset, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(dataset["refs"], out)
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.json",
        "predictions.parquet",
    ]
    table = pq.read_table(out / "predictions.parquet")
    assert table.schema.equals(PREDICTION_SCHEMA)
    assert table.num_rows == ROWS
    batch = dataset["batch"]
    np.testing.assert_array_equal(table["object_id"].to_numpy(), batch.object_id)
    np.testing.assert_array_equal(table["object_id"].to_numpy(), np.arange(500, 520))
    np.testing.assert_array_equal(table["z_true"].to_numpy(), batch.redshift)
    assert table["partition"].to_pylist() == (
        ["part-00000"] * 8 + ["part-00001"] * 8 + ["part-00002"] * 4
    )
    assert np.isfinite(table["z_pred"].to_numpy()).all()


def test_metrics_record_has_every_field(dataset, tmp_path: Path) -> None:
    out = tmp_path / "out"
    returned = run(dataset["refs"], out, batch_size=5, threads=2, backend="unit-test")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == returned
    assert metrics["tool"].startswith("cai ")

    job = metrics["job"]
    assert job.keys() >= JOB_FIELDS
    assert job["rows"] == ROWS
    assert job["partitions"] == 3
    assert job["model_depth"] == 1
    assert job["model_num_heads"] == 8
    assert job["backend"] == "unit-test"
    assert job["weights"] == f"untrained weights (seed {SEED})"
    assert job["predictions"] == "predictions.parquet"
    assert job["predictions_sha256"] == sha256_file(out / "predictions.parquet")
    assert job["started_at"] <= job["ended_at"]

    records = metrics["partitions"]
    assert [r["partition"] for r in records] == [
        "part-00000",
        "part-00001",
        "part-00002",
    ]
    assert [r["rows"] for r in records] == [8, 8, 4]
    for number, record in enumerate(records):
        assert record.keys() >= RECORD_FIELDS, RECORD_FIELDS - record.keys()
        for key in ("fetch_s", "read_s", "compute_s", "write_s", "inference_s"):
            assert record[key] >= 0, key
        assert record["inference_s"] == pytest.approx(
            record["read_s"] + record["compute_s"]
        )
        assert record["inference_s"] > 0
        assert record["bits_per_s"] == pytest.approx(
            record["rows"] * 164_000 / record["inference_s"]
        )
        assert INPUT_BITS_PER_GALAXY == 164_000
        assert record["samples_per_s"] == pytest.approx(
            record["rows"] / record["inference_s"]
        )
        assert record["wall_s"] == pytest.approx(
            record["fetch_s"]
            + record["inference_s"]
            + record["write_s"]
            + record["model_load_s"]
        )
        # The model is loaded once per job; its time counts in the first record.
        if number == 0:
            assert record["model_load_s"] == job["model_load_s"] > 0
        else:
            assert record["model_load_s"] == 0.0
        assert record["peak_rss_mb"] > 10
        assert record["batch_size"] == 5
        assert record["device"] == "cpu"
        assert record["threads"] == 2
        assert record["host"] == job["host"]
        assert record["backend"] == "unit-test"
        assert record["weights"] == job["weights"]
        assert record["started_at"] <= record["ended_at"]


def test_predictions_equal_a_direct_model_call(dataset, tmp_path: Path) -> None:
    run(dataset["refs"], tmp_path)
    z_pred = pq.read_table(tmp_path / "predictions.parquet")["z_pred"].to_numpy()
    model, _ = create_model(TINY, seed=SEED)
    batch = dataset["batch"]
    with torch.inference_mode():
        direct = model(
            torch.from_numpy(batch.image), torch.from_numpy(batch.magnitudes)
        ).numpy()
    np.testing.assert_allclose(z_pred, direct, rtol=0, atol=1e-6)


def test_results_do_not_depend_on_batch_size(dataset, tmp_path: Path) -> None:
    run(dataset["refs"], tmp_path / "b7", batch_size=7)
    run(dataset["refs"], tmp_path / "b64", batch_size=64)
    small = pq.read_table(tmp_path / "b7" / "predictions.parquet")
    large = pq.read_table(tmp_path / "b64" / "predictions.parquet")
    for column in ("object_id", "z_true", "partition"):
        assert small[column].to_pylist() == large[column].to_pylist()
    np.testing.assert_allclose(
        small["z_pred"].to_numpy(), large["z_pred"].to_numpy(), rtol=0, atol=1e-5
    )


def test_an_empty_job_writes_empty_outputs(tmp_path: Path) -> None:
    metrics = run([], tmp_path)
    assert pq.read_table(tmp_path / "predictions.parquet").num_rows == 0
    assert metrics["job"]["rows"] == 0
    assert metrics["partitions"] == []


# --------------------------------------------------------------------------------------
# Failures leave no output
# --------------------------------------------------------------------------------------


def test_corrupt_partition_raises_checksum_error_and_leaves_no_output(
    dataset, tmp_path: Path
) -> None:
    good, second, _ = dataset["refs"]
    path = copy_partition(second, tmp_path / "data", "corrupt.h5")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the image data
    path.write_bytes(bytes(data))
    corrupt = PartitionRef(second.id, str(path), second.rows, second.sha256)
    out = tmp_path / "out"
    with pytest.raises(ChecksumError, match="differs from the manifest") as info:
        run([good, corrupt], out)
    assert str(path) in str(info.value)
    assert_no_output(out)


def test_nan_pixel_raises_and_leaves_no_output(dataset, tmp_path: Path) -> None:
    good, second, _ = dataset["refs"]
    bad = write_with_nan_pixel(second, tmp_path / "data" / "nan.h5", row=5)
    out = tmp_path / "out"
    with pytest.raises(DataFormatError) as info:
        run([good, bad], out, batch_size=4)
    message = str(info.value)
    assert message.startswith(f"{bad.path}: row 5 ")
    assert "object_id 513" in message  # partition 1 starts at row 8: 500 + 8 + 5
    assert_no_output(out)


def test_nan_pixel_without_checksum_check_still_fails(dataset, tmp_path: Path) -> None:
    _, second, _ = dataset["refs"]
    bad = write_with_nan_pixel(second, tmp_path / "data" / "nan.h5", row=0)
    out = tmp_path / "out"
    with pytest.raises(DataFormatError, match="row 0 "):
        run([bad], out, verify_checksum=False)
    assert_no_output(out)


def test_failure_does_not_replace_earlier_outputs(dataset, tmp_path: Path) -> None:
    """A rerun that fails leaves the previous complete outputs untouched."""
    good, second, _ = dataset["refs"]
    out = tmp_path / "out"
    run([good], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = write_with_nan_pixel(second, tmp_path / "data" / "nan.h5", row=1)
    with pytest.raises(DataFormatError):
        run([good, bad], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_row_count_differing_from_the_manifest_is_refused(
    dataset, tmp_path: Path
) -> None:
    _, _, last = dataset["refs"]
    wrong = PartitionRef(last.id, last.path, last.rows + 1, last.sha256)
    out = tmp_path / "out"
    with pytest.raises(DataFormatError, match="holds 4 rows; the manifest says 5"):
        run([wrong], out)
    assert_no_output(out)


def test_missing_partition_is_a_format_error_naming_it(dataset, tmp_path: Path) -> None:
    first = dataset["refs"][0]
    missing = PartitionRef(first.id, str(tmp_path / "gone.h5"), first.rows, "0" * 64)
    out = tmp_path / "out"
    with pytest.raises(DataFormatError, match="no such file") as info:
        run([first, missing], out)
    assert str(tmp_path / "gone.h5") in str(info.value)
    assert_no_output(out)


def test_a_non_galaxy_file_is_refused(dataset, tmp_path: Path) -> None:
    path = tmp_path / "data" / "noise.h5"
    path.parent.mkdir()
    path.write_bytes(b"noise" * 1000)
    ref = PartitionRef("part-00000", str(path), 8, sha256_file(path))
    out = tmp_path / "out"
    with pytest.raises(DataFormatError, match="not a readable HDF5 file"):
        run([ref], out)
    assert_no_output(out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_config_error(dataset, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="'cuda' but torch sees no CUDA device"):
        run(dataset["refs"], out, device="cuda")
    assert_no_output(out)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"device": "tpu"}, "device is 'tpu'"),
        ({"threads": 0}, "threads must be >= 1"),
    ],
)
def test_bad_settings_are_config_errors(settings: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        InferenceSettings(**settings)


def test_partition_ref_from_manifest_entry() -> None:
    entry = {"id": "part-00004", "path": "/x/p.h5", "rows": "12", "bytes": 1}
    ref = PartitionRef.from_manifest(entry)
    assert ref == PartitionRef("part-00004", "/x/p.h5", 12, None)
