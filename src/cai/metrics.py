"""Redshift accuracy measures, as the AstroMAE and CAI papers define them.

With residual ``r = z_pred - z_true`` and normalised residual
``dz = (z_pred - z_true) / (1 + z_true)``:

* MAE = mean(|r|), MSE = mean(r^2) (AstroMAE's definitions, on the raw residual);
* bias = mean(dz);
* precision (NMAD) = 1.48 * median(|dz - median(dz)|);
* outlier fraction = fraction with |dz| > 0.05;
* R^2 = 1 - sum(r^2) / sum((z_true - mean(z_true))^2).

Galaxies without a true redshift (NaN) are left out and counted.
"""

from __future__ import annotations

import numpy as np

OUTLIER_DZ = 0.05  # |dz| above which a prediction is an outlier
NMAD_SCALE = 1.48  # makes the MAD a standard deviation for a normal distribution

DEFINITIONS = {
    "n": "galaxies with a known redshift",
    "mae": "mean |z_pred - z_true|",
    "mse": "mean (z_pred - z_true)^2",
    "bias": "mean dz, dz = (z_pred - z_true) / (1 + z_true)",
    "nmad": "1.48 * median |dz - median dz|",
    "outlier_fraction": f"fraction with |dz| > {OUTLIER_DZ}",
    "r2": "1 - SS_res / SS_tot",
}


def redshift_metrics(z_pred: np.ndarray, z_true: np.ndarray) -> dict[str, float]:
    """Every measure of the module docstring, computed in float64.

    Raises:
        ValueError: if the arrays differ in length or no galaxy has a known redshift.
    """
    z_pred = np.asarray(z_pred, dtype=np.float64)
    z_true = np.asarray(z_true, dtype=np.float64)
    if z_pred.shape != z_true.shape:
        raise ValueError(f"z_pred has shape {z_pred.shape}, z_true {z_true.shape}")
    known = np.isfinite(z_true)
    if not known.any():
        raise ValueError("no galaxy has a known redshift: accuracy cannot be measured")
    z_pred, z_true = z_pred[known], z_true[known]
    residual = z_pred - z_true
    dz = residual / (1.0 + z_true)
    ss_tot = float(np.sum((z_true - z_true.mean()) ** 2))
    return {
        "n": int(known.sum()),
        "mae": float(np.mean(np.abs(residual))),
        "mse": float(np.mean(residual**2)),
        "bias": float(np.mean(dz)),
        "nmad": float(NMAD_SCALE * np.median(np.abs(dz - np.median(dz)))),
        "outlier_fraction": float(np.mean(np.abs(dz) > OUTLIER_DZ)),
        "r2": float(1.0 - np.sum(residual**2) / ss_tot) if ss_tot > 0 else float("nan"),
    }


def accuracy_table(z_pred: np.ndarray, z_true: np.ndarray, weights: str):
    """The measures as a table: metric, value, definition, and the weights used.

    The ``weights`` column repeats, on every row, what made the predictions (a
    checkpoint name or "untrained weights"), so no figure can be quoted without it.
    """
    import pandas as pd

    values = redshift_metrics(z_pred, z_true)
    return pd.DataFrame(
        {
            "metric": list(values),
            "value": list(values.values()),
            "definition": [DEFINITIONS[k] for k in values],
            "weights": weights,
        }
    )


def write_accuracy_table(catalogue: str, out: str, weights: str):
    """Accuracy of a Parquet catalogue (z_pred, z_true) as a TSV at ``out``; logged."""
    import logging

    import pyarrow.parquet as pq

    from cai.atomic import atomic_path

    columns = pq.read_table(catalogue, columns=["z_pred", "z_true"])
    table = accuracy_table(
        columns["z_pred"].to_numpy(), columns["z_true"].to_numpy(), weights
    )
    with atomic_path(out) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    values = dict(zip(table["metric"], table["value"], strict=True))
    logging.getLogger(__name__).info(
        "accuracy (%s): %d galaxies, NMAD %.4f, outliers %.2f%%, bias %+.4f, "
        "MAE %.4f, R^2 %.3f -> %s",
        weights,
        values["n"],
        values["nmad"],
        100 * values["outlier_fraction"],
        values["bias"],
        values["mae"],
        values["r2"],
        out,
    )
    return table
