"""Lower precisions: each one's shapes and finiteness, the engine's records, and the
accuracy gate's arithmetic and table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import small_batch

from cai.engine import InferenceSettings, run_inference
from cai.errors import ConfigError
from cai.formats import GalaxyWriter
from cai.model import AstroMAE, ModelConfig, create_model
from cai.partition import partition_dataset, planned_partitions, read_manifest
from cai.precision import (
    GateLimits,
    best_passing,
    gate,
    prepare_model,
    run_gate,
    to_model_input,
)

SMALL = ModelConfig(depth=1, num_heads=8)


@pytest.fixture(scope="module")
def small_model() -> AstroMAE:
    return create_model(SMALL, None, 3)[0]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_each_precision_predicts_finite_redshifts(small_model, precision):
    batch = small_batch(6)
    model = prepare_model(small_model, precision)
    image, magnitudes = to_model_input(
        torch.from_numpy(batch.image), torch.from_numpy(batch.magnitudes), precision
    )
    with torch.inference_mode():
        z_pred = model(image, magnitudes).float()
    assert z_pred.shape == (6,)
    assert torch.isfinite(z_pred).all()
    with torch.inference_mode():
        reference = small_model(
            torch.from_numpy(batch.image), torch.from_numpy(batch.magnitudes)
        )
    # Close to fp32 but, for bf16 and int8, computed another way.
    assert torch.allclose(z_pred, reference, atol=0.05)


def test_conversions_leave_the_fp32_model_alone(small_model):
    before = {k: v.clone() for k, v in small_model.state_dict().items()}
    bf16 = prepare_model(small_model, "bf16")
    int8 = prepare_model(small_model, "int8")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    quantized = [m for m in int8.modules() if "quantized" in type(m).__module__]
    assert any("Conv" in type(m).__name__ for m in quantized)
    assert any("Linear" in type(m).__name__ for m in quantized)
    for key, value in small_model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert prepare_model(small_model, "fp32") is small_model


def test_unknown_precision_and_int8_on_gpu_are_refused():
    with pytest.raises(ConfigError, match=r"inference\.precision is 'fp16'"):
        InferenceSettings(precision="fp16")
    with pytest.raises(ConfigError, match="int8 runs on the CPU only"):
        InferenceSettings(precision="int8", device="cuda")


def test_gate_arithmetic_on_known_deltas():
    rng = np.random.default_rng(0)
    z_true = rng.uniform(0.01, 0.4, 1000)
    fp32 = z_true + rng.normal(0, 0.02, 1000)
    close = fp32 + 0.0005  # a uniform shift well inside max_abs_dz
    far = fp32.copy()
    far[10] += 0.01  # one galaxy moved past max_abs_dz
    rows = gate(
        {"fp32": fp32, "bf16": close, "int8": far},
        z_true,
        GateLimits(max_nmad_change=0.01, max_abs_dz=1e-3),
        {"fp32": 100.0, "bf16": 240.0, "int8": 300.0},
    )
    by = {row["precision"]: row for row in rows}
    assert by["fp32"]["max_abs_dz_pred"] == 0 and by["fp32"]["passes"]
    assert by["bf16"]["max_abs_dz_pred"] == pytest.approx(0.0005)
    assert by["bf16"]["p99_abs_dz_pred"] == pytest.approx(0.0005)
    assert by["bf16"]["passes"] and by["bf16"]["speedup_vs_fp32"] == 2.4
    assert by["int8"]["max_abs_dz_pred"] == pytest.approx(0.01)
    assert by["int8"]["p99_abs_dz_pred"] == pytest.approx(0.0, abs=1e-12)
    assert not by["int8"]["passes"] and "max |dz_pred| 1.00e-02" in by["int8"]["reason"]
    assert best_passing(rows) == "bf16"

    # NMAD: a prediction scaled away from the truth changes NMAD by a known amount.
    dz = (fp32 - z_true) / (1 + z_true)
    wider = z_true + 1.05 * dz * (1 + z_true)
    rows = gate({"fp32": fp32, "wide": wider}, z_true, GateLimits(0.01, 1.0))
    wide = rows[1]
    assert wide["nmad_change_frac"] == pytest.approx(0.05, rel=1e-6)
    assert not wide["passes"] and "NMAD moves +5.00%" in wide["reason"]
    assert gate({"fp32": fp32, "wide": wider}, z_true, GateLimits(0.06, 1.0))[1][
        "passes"
    ]
    with pytest.raises(ValueError, match="fp32"):
        gate({"bf16": close}, z_true, GateLimits())

    overflow = fp32.copy()
    overflow[:3] = np.nan  # what an overflow in bf16 would give
    row = gate({"fp32": fp32, "bf16": overflow}, z_true, GateLimits(1.0, 1.0))[1]
    assert not row["passes"] and "3 non-finite predictions" in row["reason"]


def test_engine_records_the_precision(galaxy_file, tmp_path):
    partition_dataset(galaxy_file(30), tmp_path / "parts", 0.3)
    parts = planned_partitions(read_manifest(tmp_path / "parts"))
    outputs = {}
    for precision in ("fp32", "bf16"):
        metrics = run_inference(
            parts,
            tmp_path / f"{precision}.parquet",
            tmp_path / f"{precision}.json",
            InferenceSettings(batch_size=8, precision=precision),
            SMALL,
            seed=3,
        )
        assert metrics["job"]["precision"] == precision
        assert {r["precision"] for r in metrics["partitions"]} == {precision}
        outputs[precision] = pq.read_table(tmp_path / f"{precision}.parquet")
    fp32 = outputs["fp32"]["z_pred"].to_numpy()
    bf16 = outputs["bf16"]["z_pred"].to_numpy()
    np.testing.assert_allclose(bf16, fp32, atol=0.02)
    assert not np.array_equal(bf16, fp32)


def test_gate_table_from_partitions(galaxy_file, tmp_path):
    partition_dataset(galaxy_file(40), tmp_path / "parts", 0.3)
    rows = run_gate(
        tmp_path / "parts",
        ["fp32", "bf16"],
        25,
        8,
        1,
        GateLimits(),
        tmp_path / "gate.tsv",
        SMALL,
        seed=3,
    )
    table = pd.read_csv(tmp_path / "gate.tsv", sep="\t")
    assert (
        list(table["precision"]) == ["fp32", "bf16"] == [r["precision"] for r in rows]
    )
    assert (table["galaxies"] == 25).all()
    assert table.loc[0, "max_abs_dz_pred"] == 0 and table.loc[0, "speedup_vs_fp32"] == 1
    assert table.loc[1, "max_abs_dz_pred"] > 0
    assert set(table["weights"]) == {"untrained weights (seed 3)"}


def test_gate_refuses_unlabelled_galaxies(tmp_path):
    batch = small_batch(20)
    batch.redshift[:7] = np.nan
    with GalaxyWriter(tmp_path / "g.h5", 20, {"tool": "test"}) as writer:
        writer.append(batch)
    partition_dataset(tmp_path / "g.h5", tmp_path / "parts", 0.3)
    with pytest.raises(
        ConfigError, match="7 of the gate's 20 galaxies have no redshift"
    ):
        run_gate(tmp_path / "parts", ["fp32"], 20, 8, 1, GateLimits(), tmp_path / "x")
