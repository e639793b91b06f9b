"""Fine-tuning: a real (tiny) training run, its checkpoint through inference, resume."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import small_batch
from test_split import write_galaxies

from cai.engine import InferenceSettings, run_inference
from cai.errors import ConfigError, DataFormatError
from cai.finetune import (
    DIHEDRAL,
    FinetuneSettings,
    Standardisation,
    _dihedral,
    _learning_rate,
    finetune,
    read_record,
)
from cai.formats import GalaxyWriter
from cai.metrics import redshift_metrics
from cai.model import AstroMAE, ModelConfig, create_model
from cai.partition import PartitionRef, partition_dataset, read_manifest
from cai.split import SPLITS, read_split, write_split

CAI = Path(sys.executable).with_name("cai")
TINY_MODEL = ModelConfig(
    depth=1, num_heads=8
)  # the head is full size; the encoder small
N_GALAXIES = 500  # 350 train, 50 validation, 100 test
TINY = FinetuneSettings(
    max_epochs=3, patience=3, batch_size=32, min_validation=50, threads=2
)


def test_standardisation_folds_exactly_into_the_model():
    torch.manual_seed(0)
    model = AstroMAE(TINY_MODEL).eval()
    scaling = Standardisation(
        magnitude_mean=(19.0, 17.5, 16.8, 16.4, 16.1),
        magnitude_std=(0.9, 0.8, 0.7, 0.7, 0.75),
        image_scale=(0.05, 0.2, 0.4, 0.5, 0.6),
        redshift_mean=0.12,
        redshift_std=0.06,
    )
    image = torch.rand(6, 5, 32, 32) * 3
    mags = 16 + 3 * torch.rand(6, 5)
    with torch.no_grad():
        raw = model(image, mags)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        scaling.unfold(model)
        features = model.forward_features(image)
        standardised = model.forward_head(features, *scaling.inputs(image, mags))
        torch.testing.assert_close(scaling.redshift(standardised), raw)
        scaling.fold(model)
        torch.testing.assert_close(model(image, mags), raw, rtol=1e-5, atol=1e-6)
    # Back to the same weights, to float32 rounding of b + W mu - W mu (mu ~ 17 mag).
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=1e-5, atol=1e-5)


def test_learning_rate_warms_up_then_decays_to_its_floor():
    settings = FinetuneSettings(
        max_epochs=10, learning_rate=1e-3, warmup_epochs=1, final_lr_fraction=0.01
    )
    rates = [_learning_rate(settings, step, 10) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(rates[9:]))
    assert rates[-1] == pytest.approx(1e-5, rel=0.01)


def test_dihedral_gives_the_eight_orientations():
    image = torch.rand(1, 5, 32, 32)
    turned = _dihedral(image.repeat(DIHEDRAL, 1, 1, 1), torch.arange(DIHEDRAL))
    torch.testing.assert_close(turned[0], image[0])
    torch.testing.assert_close(turned[1], torch.rot90(image[0], 1, dims=(1, 2)))
    torch.testing.assert_close(turned[4], image[0].flip(2))
    assert len({tuple(t.flatten()[:64].tolist()) for t in turned}) == DIHEDRAL


def test_settings_out_of_range_are_named():
    with pytest.raises(
        ConfigError, match=r"max_epochs = 0, batch_size = 1 out of range"
    ):
        FinetuneSettings(max_epochs=0, batch_size=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny fine-tuning: 500 synthetic galaxies, 3 epochs, a 1-block encoder."""
    folder = tmp_path_factory.mktemp("finetune")
    data = write_galaxies(folder / "galaxies.h5", N_GALAXIES, seed=11)
    write_split([data], folder / "split.parquet", 0, min_validation=50)
    record = finetune(
        [data],
        folder / "split.parquet",
        folder / "model.safetensors",
        folder / "model.json",
        TINY,
        TINY_MODEL,
        work_dir=folder / "work",
    )
    return folder, record


def test_tiny_finetune_lowers_the_validation_loss(trained):
    folder, record = trained
    assert read_record(folder / "model.json") == json.loads(
        json.dumps(record)
    )  # as written
    before = record["before_training"]["validation_loss"]
    assert record["best_validation"]["validation_loss"] < 0.5 * before
    assert [h["epoch"] for h in record["history"]] == [0, 1, 2, 3]
    assert record["trained_parameters"] == 10_398_057  # the paper's 10.4 M
    assert record["data"]["split"]["counts"] == {
        "train": 350,
        "validation": 50,
        "test": 100,
    }
    assert record["encoder"]["source"] == "seeded"
    assert "synthetic galaxies" in record["weights"]
    assert "frozen encoder untrained (seed 0)" in record["weights"]
    # The state and copied inputs are gone; the encoder cache stays for reuse.
    work = folder / "work"
    assert sorted(p.name for p in work.iterdir()) == ["features.npy", "key.json"]


def test_finetuned_checkpoint_round_trips_through_infer(trained, tmp_path):
    folder, record = trained
    partition_dataset(folder / "galaxies.h5", tmp_path / "parts", 5)
    entries = read_manifest(tmp_path / "parts/manifest.json")["partitions"]
    metrics = run_inference(
        [PartitionRef.from_manifest(entry) for entry in entries],
        tmp_path / "pred.parquet",
        tmp_path / "pred.json",
        InferenceSettings(batch_size=256, threads=2),
        TINY_MODEL,
        folder / "model.safetensors",
    )
    assert metrics["job"]["weights"] == record["weights"]
    predictions = pq.read_table(tmp_path / "pred.parquet").to_pandas()
    split = read_split(folder / "split.parquet")
    codes = split.codes_of(predictions["object_id"].to_numpy(), "pred.parquet")
    validation = predictions[codes == SPLITS.index("validation")]
    # infer, on raw inputs with the folded checkpoint, predicts what training
    # measured on standardised inputs for the model it kept (recentred).
    got = redshift_metrics(validation["z_pred"], validation["z_true"])
    kept = record["validation"]
    assert got["nmad"] == pytest.approx(kept["validation_nmad"], rel=1e-4)
    assert got["mse"] == pytest.approx(kept["validation_loss"], rel=1e-4)
    # Recentring took out the median validation residual.
    residual = validation["z_pred"] - validation["z_true"]
    assert abs(residual.median()) < 1e-4
    best = record["best_validation"]
    assert got["nmad"] == pytest.approx(best["validation_nmad"], rel=0.05)


def test_finetune_refuses_unlabelled_galaxies(tmp_path):
    data = write_galaxies(tmp_path / "g.h5", N_GALAXIES, unlabelled=3)
    labelled = write_galaxies(tmp_path / "l.h5", N_GALAXIES)
    write_split([labelled], tmp_path / "split.parquet", 0, min_validation=50)
    with pytest.raises(DataFormatError, match="3 galaxies have no redshift"):
        refused_finetune(data, tmp_path)


def refused_finetune(data: Path, folder: Path) -> None:
    """Fine-tune on ``data`` with the split in ``folder``, which must raise and
    leave neither a checkpoint nor a record."""
    try:
        finetune(
            [data],
            folder / "split.parquet",
            folder / "m.safetensors",
            folder / "m.json",
            TINY,
            TINY_MODEL,
            work_dir=folder / "work",
        )
    finally:
        assert not (folder / "m.safetensors").exists()
        assert not (folder / "m.json").exists()


def test_finetune_refuses_a_galaxy_with_a_non_finite_image(tmp_path):
    data = tmp_path / "g.h5"
    batch = small_batch(N_GALAXIES, 5, 1)
    batch.image[7, 2, 10, 10] = np.nan
    with GalaxyWriter(data, N_GALAXIES, {"generator": "cai.sky.simulate"}) as writer:
        writer.append(batch)
    write_split([data], tmp_path / "split.parquet", 0, min_validation=50)
    with pytest.raises(DataFormatError, match=rf"{data}: row 7 \(object_id 8\)"):
        refused_finetune(data, tmp_path)


def finetune_command(folder: Path, epochs: int) -> list[str]:
    return [
        str(CAI),
        "finetune",
        str(folder / "galaxies.h5"),
        "--split",
        str(folder / "split.parquet"),
        "--out",
        str(folder / "model.safetensors"),
        "--work-dir",
        str(folder / "work"),
        "--depth",
        "1",
        "--max-epochs",
        str(epochs),
        "--patience",
        str(epochs),
        "--batch-size",
        "32",
        "--threads",
        "2",
        "--min-validation",
        "50",
    ]


def saved_epoch(state: Path) -> int:
    try:
        return int(torch.load(state, weights_only=True)["epoch"])
    except Exception:  # not there yet, or being replaced
        return 0


def test_killed_finetune_resumes_after_its_last_epoch(tmp_path):
    data = write_galaxies(tmp_path / "galaxies.h5", N_GALAXIES, seed=11)
    write_split([data], tmp_path / "split.parquet", 0, min_validation=50)
    epochs = 6
    process = subprocess.Popen(
        finetune_command(tmp_path, epochs),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    state = tmp_path / "work/state.pt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and saved_epoch(state) < 2:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = saved_epoch(state)
    assert 2 <= killed_at < epochs, f"killed at epoch {killed_at}"
    assert not (tmp_path / "model.safetensors").exists()
    before = torch.load(state, weights_only=True)["history"]

    resumed = subprocess.run(
        finetune_command(tmp_path, epochs), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming after epoch {killed_at} of {epochs}" in resumed.stderr
    assert "encoder features: 400 galaxies from the cache" in resumed.stderr
    record = read_record(tmp_path / "model.json")
    assert record["resumed_after_epoch"] == killed_at
    assert [h["epoch"] for h in record["history"]] == list(range(epochs + 1))
    assert record["history"][: killed_at + 1] == before

    # The same training without the kill reaches the same weights.
    again = tmp_path / "again"
    again.mkdir()
    for name in ("galaxies.h5", "split.parquet"):
        (again / name).symlink_to(tmp_path / name)
    whole = subprocess.run(
        finetune_command(again, epochs), capture_output=True, text=True, timeout=600
    )
    assert whole.returncode == 0, whole.stderr[-3000:]
    uninterrupted = read_record(again / "model.json")
    losses = [h["validation_loss"] for h in uninterrupted["history"]]
    assert [h["validation_loss"] for h in record["history"]] == pytest.approx(
        losses, rel=1e-5
    )
    a, _ = create_model(TINY_MODEL, tmp_path / "model.safetensors")
    b, _ = create_model(TINY_MODEL, again / "model.safetensors")
    for (key, x), y in zip(
        a.state_dict().items(), b.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=key)


def test_cli_refuses_a_validation_split_too_small(tmp_path):
    data = write_galaxies(tmp_path / "g.h5", 300)
    result = subprocess.run(
        [str(CAI), "split", str(data), "--out", str(tmp_path / "s.parquet")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "at least 1,000 labelled galaxies" in result.stderr
