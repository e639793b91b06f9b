"""Tests of the redshift accuracy measures against values worked out by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cai.metrics import (
    DEFINITIONS,
    accuracy_table,
    redshift_metrics,
    write_accuracy_table,
)

# A literal example, every measure worked out by hand.
#
#   z_true = [0.0,   1.0,  0.5,  2.0]
#   z_pred = [0.03,  0.8,  0.5,  2.3]
#   r = z_pred - z_true       = [0.03, -0.2, 0.0, 0.3]
#   1 + z_true                = [1.0,   2.0, 1.5, 3.0]
#   dz = r / (1 + z_true)     = [0.03, -0.1, 0.0, 0.1]
#
#   MAE  = (0.03 + 0.2 + 0 + 0.3) / 4            = 0.53 / 4     = 0.1325
#   MSE  = (0.0009 + 0.04 + 0 + 0.09) / 4        = 0.1309 / 4   = 0.032725
#   bias = (0.03 - 0.1 + 0 + 0.1) / 4            = 0.03 / 4     = 0.0075
#   NMAD: median dz = median(-0.1, 0, 0.03, 0.1) = (0 + 0.03)/2 = 0.015
#         |dz - 0.015| = [0.015, 0.115, 0.015, 0.085]
#         median = median(0.015, 0.015, 0.085, 0.115) = (0.015 + 0.085)/2 = 0.05
#         NMAD = 1.48 * 0.05                                     = 0.074
#   outliers: |dz| > 0.05 for -0.1 and 0.1 (not 0.03, 0)  -> 2 / 4 = 0.5
#   R^2: mean z_true = 3.5 / 4 = 0.875
#        SS_tot = 0.875^2 + 0.125^2 + 0.375^2 + 1.125^2
#               = 0.765625 + 0.015625 + 0.140625 + 1.265625     = 2.1875
#        SS_res = 0.1309
#        R^2 = 1 - 0.1309 / 2.1875 = 1 - 0.05984                 = 0.94016
Z_TRUE = [0.0, 1.0, 0.5, 2.0]
Z_PRED = [0.03, 0.8, 0.5, 2.3]
EXPECTED = {
    "n": 4,
    "mae": 0.1325,
    "mse": 0.032725,
    "bias": 0.0075,
    "nmad": 0.074,
    "outlier_fraction": 0.5,
    "r2": 0.94016,
}


def test_every_measure_matches_the_hand_computed_value() -> None:
    values = redshift_metrics(np.array(Z_PRED), np.array(Z_TRUE))
    assert list(values) == list(EXPECTED)
    assert values["n"] == 4
    assert isinstance(values["n"], int)
    for name, expected in EXPECTED.items():
        assert values[name] == pytest.approx(expected, rel=1e-12, abs=1e-15), name


def test_float32_inputs_are_measured_in_float64() -> None:
    values = redshift_metrics(
        np.array(Z_PRED, dtype=np.float32), np.array(Z_TRUE, dtype=np.float32)
    )
    for name, expected in EXPECTED.items():
        assert values[name] == pytest.approx(expected, rel=1e-6, abs=1e-7), name


def test_unknown_redshifts_are_left_out_and_counted() -> None:
    z_true = np.array([np.nan, *Z_TRUE[:2], np.nan, *Z_TRUE[2:], np.nan])
    z_pred = np.array([5.0, *Z_PRED[:2], -3.0, *Z_PRED[2:], 0.7])
    values = redshift_metrics(z_pred, z_true)
    assert values["n"] == 4  # 7 galaxies, 3 without a true redshift
    for name, expected in EXPECTED.items():
        assert values[name] == pytest.approx(expected, rel=1e-12, abs=1e-15), name


def test_all_unknown_redshifts_raise() -> None:
    with pytest.raises(ValueError, match="no galaxy has a known redshift"):
        redshift_metrics(np.array([0.1, 0.2]), np.array([np.nan, np.nan]))


def test_empty_input_raises() -> None:
    with pytest.raises(ValueError, match="no galaxy has a known redshift"):
        redshift_metrics(np.array([]), np.array([]))


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match=r"z_pred has shape \(3,\), z_true \(4,\)"):
        redshift_metrics(np.array(Z_PRED[:3]), np.array(Z_TRUE))


def test_perfect_predictions() -> None:
    values = redshift_metrics(np.array(Z_TRUE), np.array(Z_TRUE))
    assert values["mae"] == values["mse"] == values["bias"] == values["nmad"] == 0.0
    assert values["outlier_fraction"] == 0.0
    assert values["r2"] == 1.0


def test_r2_is_nan_when_every_true_redshift_is_equal() -> None:
    values = redshift_metrics(np.array([0.4, 0.6]), np.array([0.5, 0.5]))
    assert math.isnan(values["r2"])
    assert values["mae"] == pytest.approx(0.1)


def test_accuracy_table_has_every_measure_and_weights_on_every_row() -> None:
    weights = "checkpoint astromae.safetensors"
    table = accuracy_table(np.array(Z_PRED), np.array(Z_TRUE), weights)
    assert list(table.columns) == ["metric", "value", "definition", "weights"]
    assert list(table["metric"]) == list(EXPECTED)
    assert (table["weights"] == weights).all()
    assert table["weights"].notna().all()
    assert list(table["definition"]) == [DEFINITIONS[m] for m in EXPECTED]
    for metric, value in zip(table["metric"], table["value"], strict=True):
        assert value == pytest.approx(EXPECTED[metric], rel=1e-12, abs=1e-15)


def test_write_accuracy_table_reads_a_catalogue(tmp_path: Path) -> None:
    catalogue = tmp_path / "catalogue.parquet"
    pq.write_table(
        pa.table(
            {
                "object_id": pa.array([1, 2, 3, 4, 5], pa.int64()),
                "z_pred": pa.array([*Z_PRED, 0.2], pa.float32()),
                "z_true": pa.array([*Z_TRUE, np.nan], pa.float32()),
            }
        ),
        catalogue,
    )
    out = tmp_path / "accuracy.tsv"
    write_accuracy_table(str(catalogue), str(out), "untrained weights (seed 0)")
    table = pd.read_csv(out, sep="\t")
    assert list(table["metric"]) == list(EXPECTED)
    assert (table["weights"] == "untrained weights (seed 0)").all()
    values = dict(zip(table["metric"], table["value"], strict=True))
    assert values["n"] == 4
    for name, expected in EXPECTED.items():
        assert values[name] == pytest.approx(expected, rel=1e-5, abs=1e-7), name
