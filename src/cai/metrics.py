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

import os
from typing import Any

import numpy as np

OUTLIER_DZ = 0.05  # |dz| above which a prediction is an outlier
NMAD_SCALE = 1.48  # makes the MAD a standard deviation for a normal distribution
# In the weights label of every fine-tuned checkpoint (cai.finetune): its accuracy
# over a whole catalogue may count galaxies it was trained on.
FINETUNED_MARK = "head fine-tuned on"

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


def evaluation_set(
    catalogue: str | os.PathLike, split: str | os.PathLike | None = None
) -> tuple[Any, str]:
    """The galaxies of a catalogue that accuracy is measured on, and what they are.

    Without a split: every row. With one (fine-tuning made it): only the test split's
    galaxies, once each; every test galaxy must be in the catalogue.

    Returns:
        A DataFrame (object_id, z_pred, z_true) and a one-line description.
    """
    import pyarrow.parquet as pq

    from cai.errors import DataFormatError
    from cai.split import read_split

    frame = pq.read_table(catalogue, columns=["object_id", "z_pred", "z_true"])
    frame = frame.to_pandas()
    if split is None:
        return frame, f"every galaxy of the catalogue ({len(frame):,})"
    table = read_split(split)
    test_ids = table.ids("test")
    test = frame.drop_duplicates("object_id")
    test = test[test["object_id"].isin(test_ids)].reset_index(drop=True)
    if len(test) != len(test_ids):
        absent = np.setdiff1d(test_ids, test["object_id"].to_numpy())
        raise DataFormatError(
            f"{catalogue}: lacks {len(absent):,} of the {len(test_ids):,} test galaxies "
            f"of {split} (e.g. object_id {int(absent[0])}); the catalogue and the "
            "split come from different galaxies: rerun the workflow"
        )
    total = sum(table.meta["counts"].values())
    return test, (
        f"test split: {len(test):,} of {total:,} labelled galaxies, never trained on"
    )


def write_accuracy_table(
    catalogue: str | os.PathLike,
    out: str | os.PathLike,
    weights: str,
    split: str | os.PathLike | None = None,
    baseline: str | os.PathLike | None = None,
):
    """Accuracy of a Parquet catalogue (z_pred, z_true) as a TSV at ``out``; logged.

    With ``split``, only its test galaxies count; with ``baseline`` (the kNN
    yardstick's test predictions, :mod:`cai.baseline`), its figures on the same
    galaxies stand in a column ``knn_baseline`` beside the model's ``value``.
    """
    import logging

    from cai.atomic import atomic_path

    galaxies, evaluated_on = evaluation_set(catalogue, split)
    table = accuracy_table(
        galaxies["z_pred"].to_numpy(), galaxies["z_true"].to_numpy(), weights
    )
    values = dict(zip(table["metric"], table["value"], strict=True))
    baseline_note = ""
    if baseline is not None:
        from cai.baseline import read_baseline
        from cai.errors import DataFormatError

        predicted, meta = read_baseline(baseline)
        same = galaxies[["object_id"]].merge(predicted, on="object_id", how="inner")
        if len(same) != len(galaxies) or len(predicted) != len(galaxies):
            raise DataFormatError(
                f"{baseline}: predicts {len(predicted):,} galaxies, of which "
                f"{len(same):,} are among the {len(galaxies):,} evaluated in "
                f"{catalogue}; both must come from the same split: rerun the workflow"
            )
        yardstick = redshift_metrics(
            same["z_pred"].to_numpy(), same["z_true"].to_numpy()
        )
        table.insert(2, "knn_baseline", [yardstick[k] for k in table["metric"]])
        table["baseline"] = meta["description"]
        baseline_note = (
            f" (kNN baseline: NMAD {yardstick['nmad']:.4f}, outliers "
            f"{100 * yardstick['outlier_fraction']:.2f}%)"
        )
    if split is None and FINETUNED_MARK in weights:
        evaluated_on += ", which may include galaxies the weights were fine-tuned on"
        logging.getLogger(__name__).warning(
            "accuracy of fine-tuned weights (%s) over every galaxy of %s: any it was "
            "trained or validated on flatter the figures; give the split it was "
            "trained with (cai metrics --split) to count its test split only",
            weights,
            catalogue,
        )
    table["evaluated_on"] = evaluated_on
    with atomic_path(out) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    logging.getLogger(__name__).info(
        "accuracy (%s) on the %s: NMAD %.4f, outliers %.2f%%, bias %+.4f, MAE %.4f, "
        "R^2 %.3f%s -> %s",
        weights,
        evaluated_on,
        values["nmad"],
        100 * values["outlier_fraction"],
        values["bias"],
        values["mae"],
        values["r2"],
        baseline_note,
        out,
    )
    return table


def accuracy_summary(path: str | os.PathLike) -> str:
    """Two lines on an accuracy table for the terminal: what was measured on which
    galaxies, and the main figures beside the baseline's when there is one."""
    import pandas as pd

    table = pd.read_csv(path, sep="\t").set_index("metric")
    values = table["value"]
    line = (
        f"NMAD {values['nmad']:.4f}, outliers {100 * values['outlier_fraction']:.1f}%, "
        f"bias {values['bias']:+.4f}, R^2 {values['r2']:.3f}"
    )
    if "knn_baseline" in table:
        knn = table["knn_baseline"]
        line += (
            f" (kNN colours baseline: NMAD {knn['nmad']:.4f}, outliers "
            f"{100 * knn['outlier_fraction']:.1f}%)"
        )
    where = table["evaluated_on"].iloc[0] if "evaluated_on" in table else ""
    return f"accuracy of {table['weights'].iloc[0]} on the {where} ({path}):\n  {line}"
