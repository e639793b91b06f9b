"""The labelled galaxies split into train, validation and test, as the paper splits them.

The fine-tuning phase of AstroMAE trains on 70 % of the labelled galaxies, stops early
on 10 % and reports accuracy on the last 20 %, which the model never saw. Here each
galaxy's split follows from a seeded hash of its ``object_id``: the galaxies are ranked
by that hash and cut at the fractions, so the split is

* deterministic (the same seed and galaxies give the same split on any machine),
* disjoint and exact in its counts (ranks are cut once),
* independent of the order of the rows and of how the galaxies are partitioned.

The split is a Parquet table (``object_id``, ``split``) with the seed, fractions and
counts in its metadata; fine-tuning, the kNN baseline and the accuracy table all read
the same file.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cai.atomic import atomic_path
from cai.errors import ConfigError, DataFormatError
from cai.formats import GalaxyFile

_logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
PAPER_FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}
# Fewest validation galaxies whose NMAD can steer early stopping: the NMAD of n
# Gaussian errors scatters by about 1.17 / sqrt(n) of itself (12 % at n = 100).
MIN_VALIDATION = 100
SPLIT_METADATA_KEY = b"cai_split"
# splitmix64's finaliser constants (Steele, Lea and Flood 2014).
_MIX_SHIFTS = (30, 27, 31)
_MIX_MULTIPLIERS = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def _mix64(values: np.ndarray) -> np.ndarray:
    """A bijective scramble of 64-bit integers (splitmix64's finaliser)."""
    x = np.asarray(values).astype(np.uint64, copy=True)
    for shift, multiplier in zip(_MIX_SHIFTS[:2], _MIX_MULTIPLIERS, strict=True):
        x ^= x >> np.uint64(shift)
        x *= np.uint64(multiplier)  # wraps modulo 2^64, as intended
    x ^= x >> np.uint64(_MIX_SHIFTS[2])
    return x


def check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """The split fractions in SPLITS order; each in (0, 1), summing to 1."""
    if sorted(fractions) != sorted(SPLITS):
        raise ConfigError(
            f"finetune.split has keys {sorted(fractions)}; expected {list(SPLITS)}"
        )
    checked = {name: float(fractions[name]) for name in SPLITS}
    if not all(0.0 < f < 1.0 for f in checked.values()):
        raise ConfigError(
            f"finetune.split fractions must each lie in (0, 1), got {checked}"
        )
    if not math.isclose(sum(checked.values()), 1.0, abs_tol=1e-9):
        raise ConfigError(
            f"finetune.split fractions sum to {sum(checked.values()):g}; expected 1 "
            f"(the paper's: {PAPER_FRACTIONS})"
        )
    return checked


def split_counts(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Galaxies in each split of ``n``: train and validation rounded, test the rest."""
    fractions = check_fractions(fractions)
    train = round(fractions["train"] * n)
    validation = min(n - train, round(fractions["validation"] * n))
    return {"train": train, "validation": validation, "test": n - train - validation}


def check_split_sizes(
    counts: Mapping[str, int],
    fractions: Mapping[str, float],
    min_validation: int = MIN_VALIDATION,
) -> None:
    """Refuse a split whose validation part is too small for its NMAD to steer early
    stopping, or with no galaxy to train on or to test."""
    total = sum(counts.values())
    if counts["validation"] < min_validation:
        needed = math.ceil(min_validation / fractions["validation"])
        while split_counts(needed, fractions)["validation"] < min_validation:
            needed += 1
        raise ConfigError(
            f"the validation split would hold {counts['validation']:,} of {total:,} "
            f"labelled galaxies ({fractions['validation']:.0%}); the early-stopping "
            f"NMAD needs at least {min_validation:,} (finetune.min_validation): give "
            f"at least {needed:,} labelled galaxies, or raise finetune.split."
            "validation, or set finetune.train: false"
        )
    for name in ("train", "test"):
        if counts[name] < 2:
            raise ConfigError(
                f"the {name} split would hold {counts[name]} of {total:,} labelled "
                f"galaxies; it needs at least 2: give more labelled galaxies or raise "
                f"finetune.split.{name}"
            )


def check_unique_ids(
    object_id: np.ndarray, files: Sequence[Mapping[str, Any]] | None = None
) -> None:
    """Refuse object_ids that occur more than once (a galaxy could land in two splits,
    and the test figures would include galaxies trained on).

    Args:
        object_id: The ids of every galaxy, file after file.
        files: ``{"path", "rows"}`` of each file in that order, to name where the
            first repeated ids are.

    Raises:
        DataFormatError: naming the count, the first repeated ids and their files.
    """
    ids = np.asarray(object_id, dtype=np.int64)
    unique, counts = np.unique(ids, return_counts=True)
    if len(unique) == len(ids):
        return
    repeated = unique[counts > 1]
    examples = ", ".join(map(str, repeated[:5]))
    if files:
        file_of_row = np.repeat(np.arange(len(files)), [f["rows"] for f in files])
        holders = np.unique(file_of_row[np.isin(ids, repeated[:5])])
        examples += " in " + ", ".join(str(files[i]["path"]) for i in holders)
    raise DataFormatError(
        f"{len(repeated):,} object_ids occur more than once (e.g. {examples}); each "
        "labelled galaxy must appear once, or it could be trained on and tested on"
    )


def assign_splits(
    object_id: np.ndarray, seed: int, fractions: Mapping[str, float]
) -> np.ndarray:
    """Index into SPLITS (int8) of each galaxy, from a seeded hash of its object_id.

    Raises:
        DataFormatError: if an object_id occurs twice (the galaxy could land in two
            splits, and the test figures would include galaxies trained on).
    """
    ids = np.asarray(object_id, dtype=np.int64)
    check_unique_ids(ids)
    salt = _mix64(np.array([seed], dtype=np.int64).view(np.uint64))
    rank = np.argsort(_mix64(ids.view(np.uint64) ^ salt), kind="stable")
    sizes = split_counts(len(ids), fractions)
    codes = np.empty(len(ids), dtype=np.int8)
    start = 0
    for code, name in enumerate(SPLITS):
        codes[rank[start : start + sizes[name]]] = code
        start += sizes[name]
    return codes


@dataclass
class Labels:
    """What a split needs of a set of galaxy files: ids, redshifts, magnitudes.

    Attributes:
        object_id: [n] int64.
        redshift: [n] float32.
        magnitudes: [n, 5] float32.
        files: each input file with its row count.
        synthetic: whether every file was made by the synthetic sky (``cai simulate``).
    """

    object_id: np.ndarray
    redshift: np.ndarray
    magnitudes: np.ndarray
    files: list[dict[str, Any]]
    synthetic: bool


def read_labels(paths: Sequence[str | os.PathLike]) -> Labels:
    """Read ids, redshifts and magnitudes of galaxy files (no images), refusing
    galaxies without a redshift.

    Raises:
        DataFormatError: if no file is given, or naming each file that holds
            unlabelled galaxies (NaN redshift) with their count.
    """
    if not paths:
        raise DataFormatError(
            "no galaxy files given: fine-tuning needs labelled galaxies"
        )
    ids, z, mags, files, unlabelled = [], [], [], [], {}
    for path in paths:
        with GalaxyFile(path) as galaxies:
            generator = str(galaxies.provenance.get("generator", ""))
            columns = galaxies.read_fields(["object_id", "redshift", "magnitudes"])
        file_ids, file_z, file_mags = columns.values()
        infinite = np.flatnonzero(np.isinf(file_z))
        if len(infinite):
            row = int(infinite[0])
            raise DataFormatError(
                f"{path}: {len(infinite):,} galaxies have an infinite redshift (first: "
                f"row {row}, object_id {int(file_ids[row])}); expected a finite "
                "redshift, or NaN for an unlabelled galaxy"
            )
        missing = int(np.isnan(file_z).sum())
        if missing:
            unlabelled[str(path)] = (missing, len(file_z))
        ids.append(file_ids)
        z.append(file_z)
        mags.append(file_mags)
        files.append({"path": str(path), "rows": len(file_z), "generator": generator})
    if unlabelled:
        total = sum(missing for missing, _ in unlabelled.values())
        where = "; ".join(f"{p}: {m:,} of {n:,}" for p, (m, n) in unlabelled.items())
        raise DataFormatError(
            f"{total:,} galaxies have no redshift (NaN) ({where}); fine-tuning and its "
            "train/validation/test split need labelled galaxies only: leave the "
            "unlabelled ones out of its input, or set finetune.train: false"
        )
    return Labels(
        object_id=np.concatenate(ids),
        redshift=np.concatenate(z),
        magnitudes=np.concatenate(mags),
        files=files,
        synthetic=all(f["generator"].startswith("cai.sky") for f in files),
    )


def write_split(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    seed: int,
    fractions: Mapping[str, float] | None = None,
    min_validation: int = MIN_VALIDATION,
) -> dict[str, Any]:
    """Split the labelled galaxies of ``paths``; write the split table to ``out``.

    Returns:
        The table's metadata: seed, fractions, counts, input files, synthetic.
    """
    fractions = check_fractions(fractions or PAPER_FRACTIONS)
    labels = read_labels(paths)
    counts = split_counts(len(labels.object_id), fractions)
    check_split_sizes(counts, fractions, min_validation)
    check_unique_ids(labels.object_id, labels.files)
    codes = assign_splits(labels.object_id, seed, fractions)
    meta = {
        "seed": seed,
        "fractions": fractions,
        "counts": counts,
        "files": labels.files,
        "synthetic": labels.synthetic,
    }
    table = pa.table(
        {
            "object_id": pa.array(labels.object_id, pa.int64()),
            "split": pa.DictionaryArray.from_arrays(
                pa.array(codes), pa.array(list(SPLITS))
            ),
        }
    ).replace_schema_metadata({SPLIT_METADATA_KEY: json.dumps(meta)})
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    _logger.info(
        "split: %s labelled galaxies (seed %d) -> train %s, validation %s, test %s "
        "-> %s",
        f"{sum(counts.values()):,}",
        seed,
        *(f"{counts[name]:,}" for name in SPLITS),
        out,
    )
    return meta


@dataclass
class Split:
    """A split table: object_id and split index (into SPLITS) of each galaxy, and its
    metadata."""

    object_id: np.ndarray
    code: np.ndarray
    meta: dict[str, Any]

    def ids(self, name: str) -> np.ndarray:
        """The object_ids of split ``name``."""
        return self.object_id[self.code == SPLITS.index(name)]

    def codes_of(self, object_id: np.ndarray, where: str) -> np.ndarray:
        """The split index of each of ``object_id``; raises if one is not in the split
        (``where`` names the file those ids come from)."""
        order = np.argsort(self.object_id)
        pos = np.searchsorted(self.object_id, object_id, sorter=order)
        pos = np.minimum(pos, len(order) - 1)
        found = self.object_id[order[pos]] == object_id
        if not found.all():
            raise DataFormatError(
                f"{where}: {int((~found).sum()):,} galaxies (e.g. object_id "
                f"{int(object_id[~found][0])}) are not in the split; the split was made "
                "from other galaxies: rerun the split step"
            )
        return self.code[order[pos]]


def read_split(path: str | os.PathLike) -> Split:
    """Read a split table written by :func:`write_split`."""
    try:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[SPLIT_METADATA_KEY])
        names = table["split"].combine_chunks()
        code = np.asarray(names.indices, dtype=np.int8)
        if list(names.dictionary.to_pylist()) != list(SPLITS):
            raise ValueError(f"split names {names.dictionary.to_pylist()}")
    except (OSError, KeyError, TypeError, ValueError, pa.ArrowException) as err:
        raise DataFormatError(
            f"{path}: not a split table written by 'cai split' ({err})"
        ) from None
    return Split(
        object_id=table["object_id"].to_numpy(),
        code=code,
        meta=meta,
    )


def split_galaxies(path: str | os.PathLike) -> dict[str, int]:
    """Counts per split of a split table (for logs and reports)."""
    return dict(read_split(path).meta["counts"])
