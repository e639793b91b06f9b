"""A colours-only yardstick for the redshift model: k nearest neighbours.

The classic photometric redshift without images: each test galaxy gets the mean
redshift of its k nearest training galaxies in the space of its four colours (u-g,
g-r, r-i, i-z) and its r magnitude, each standardised by the training split's spread.
k is chosen on the validation split (the smallest validation NMAD), as fine-tuning
chooses its epoch, and the test split is predicted once. A model that does not beat
this number has learnt nothing from the images that the five magnitudes do not say.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cai.atomic import atomic_path
from cai.errors import DataFormatError
from cai.metrics import redshift_metrics
from cai.split import SPLITS, read_labels, read_split

_logger = logging.getLogger(__name__)

K_CHOICES = (4, 8, 16, 32, 64)  # neighbours tried on the validation split
DISTANCE_BUDGET = 1 << 25  # distances computed at once (128 MiB of float32)
BASELINE_METADATA_KEY = b"cai_baseline"
DESCRIPTION = "k nearest neighbours on the colours u-g, g-r, r-i, i-z and r"


def colour_features(magnitudes: np.ndarray) -> np.ndarray:
    """[n, 5] float64: u-g, g-r, r-i, i-z and r from [n, 5] ugriz magnitudes."""
    m = np.asarray(magnitudes, dtype=np.float64)
    return np.column_stack([m[:, :4] - m[:, 1:], m[:, 2]])


def nearest_mean(
    train_x: np.ndarray,
    train_z: np.ndarray,
    query_x: np.ndarray,
    ks: Sequence[int],
) -> dict[int, np.ndarray]:
    """For each k of ``ks`` (at most the number of training points), the mean
    ``train_z`` of each query's k nearest training points (Euclidean), computed in
    blocks of queries so memory stays bounded."""
    k_max = max(ks)
    if k_max > len(train_x):
        raise ValueError(f"k = {k_max} neighbours of {len(train_x)} training points")
    reference = torch.from_numpy(np.ascontiguousarray(train_x))
    values = torch.from_numpy(np.asarray(train_z, dtype=np.float64))
    block = max(1, DISTANCE_BUDGET // max(1, len(train_x)))
    out = {k: np.empty(len(query_x)) for k in ks}
    for start in range(0, len(query_x), block):
        query = torch.from_numpy(np.ascontiguousarray(query_x[start : start + block]))
        nearest = torch.cdist(query, reference).topk(k_max, largest=False).indices
        neighbour_z = values[nearest]  # [b, k_max], nearest first
        for k in ks:
            out[k][start : start + len(query)] = neighbour_z[:, :k].mean(dim=1).numpy()
    return out


def knn_baseline(
    galaxy_files: Sequence[str | os.PathLike],
    split_path: str | os.PathLike,
    out: str | os.PathLike,
    ks: Sequence[int] = K_CHOICES,
) -> dict[str, Any]:
    """Fit the kNN baseline on the training split, choose k on validation, predict the
    test split; write ``object_id, z_pred, z_true`` of the test galaxies (Parquet, the
    choice of k and the validation scores in its metadata).

    Returns:
        The metadata: k, validation NMAD per k, test counts, description.
    """
    tick = time.perf_counter()
    split = read_split(split_path)
    labels = read_labels(galaxy_files)
    codes = split.codes_of(labels.object_id, ", ".join(map(str, galaxy_files)))
    features = colour_features(labels.magnitudes)
    train = codes == SPLITS.index("train")
    mean, std = features[train].mean(axis=0), features[train].std(axis=0)
    features = (features - mean) / np.where(std > 0, std, 1.0)
    z = labels.redshift.astype(np.float64)

    validation = codes == SPLITS.index("validation")
    # Every k tried must have k training galaxies to average.
    ks = [k for k in ks if k <= train.sum()]
    if not ks or not validation.any():
        raise DataFormatError(
            f"{split_path}: {int(train.sum()):,} train and {int(validation.sum()):,} "
            f"validation galaxies; the kNN baseline needs at least {min(K_CHOICES)} "
            "train galaxies and a validation split to choose k on"
        )
    scores = {
        k: redshift_metrics(pred, z[validation])["nmad"]
        for k, pred in nearest_mean(
            features[train], z[train], features[validation], ks
        ).items()
    }
    best_k = min(scores, key=lambda k: (scores[k], k))
    test = codes == SPLITS.index("test")
    z_pred = nearest_mean(features[train], z[train], features[test], [best_k])[best_k]
    meta = {
        "description": f"{DESCRIPTION} (k = {best_k}, chosen on the validation split)",
        "k": best_k,
        "validation_nmad": {str(k): v for k, v in scores.items()},
        "train": int(train.sum()),
        "test": int(test.sum()),
        "seconds": time.perf_counter() - tick,
    }
    table = pa.table(
        {
            "object_id": pa.array(labels.object_id[test], pa.int64()),
            "z_pred": pa.array(z_pred.astype(np.float32), pa.float32()),
            "z_true": pa.array(labels.redshift[test], pa.float32()),
        }
    ).replace_schema_metadata({BASELINE_METADATA_KEY: json.dumps(meta)})
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    test_metrics = redshift_metrics(z_pred, z[test])
    _logger.info(
        "kNN baseline: k = %d (validation NMAD %s), %s test galaxies: NMAD %.4f, "
        "outliers %.1f%%, %.1f s -> %s",
        best_k,
        ", ".join(f"k={k} {v:.4f}" for k, v in scores.items()),
        f"{int(test.sum()):,}",
        test_metrics["nmad"],
        100 * test_metrics["outlier_fraction"],
        meta["seconds"],
        out,
    )
    return meta


def read_baseline(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """The baseline's test predictions (a pandas DataFrame) and its metadata."""
    try:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[BASELINE_METADATA_KEY])
    except (OSError, KeyError, TypeError, ValueError, pa.ArrowException) as err:
        raise DataFormatError(
            f"{path}: not a baseline table written by 'cai baseline' ({err})"
        ) from None
    return table.to_pandas(), meta
