"""Import the paper's partition files into the CAI galaxy format.

The paper stores each partition as ``torch.save(TensorDataset(images, magnitudes,
redshift))`` with images [N, 5, 32, 32], magnitudes [N, 5] and redshift [N], float32.
They are read with ``weights_only=True`` and one allowed class, ``TensorDataset``, so
loading never runs code from the file; tensors are memory-mapped, not copied whole.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from cai import __version__
from cai.atomic import sha256_file
from cai.errors import DataFormatError
from cai.formats import IMAGE_SHAPE, GalaxyBatch, GalaxyWriter, check_finite

_logger = logging.getLogger(__name__)

ALLOWED_GLOBALS = [TensorDataset]
IMPORT_ROWS = 1024  # rows converted at a time


def load_pt(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, magnitudes and redshift tensors of one paper file, shape-checked."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataFormatError(
            f"{path}: cannot be loaded safely ({type(err).__name__}: {first_line}); "
            "expected torch.save(TensorDataset(images, magnitudes, redshift)) holding "
            "tensors only"
        ) from None
    tensors = obj.tensors if isinstance(obj, TensorDataset) else obj
    if (
        not isinstance(tensors, tuple | list)
        or len(tensors) != 3
        or not all(isinstance(t, torch.Tensor) for t in tensors)
    ):
        raise DataFormatError(
            f"{path}: holds {type(obj).__name__}; expected a TensorDataset of three "
            "tensors (images, magnitudes, redshift)"
        )
    images, magnitudes, redshift = tensors
    if redshift.dim() == 2 and redshift.shape[1] == 1:
        redshift = redshift[:, 0]
    n = images.shape[0] if images.dim() else -1
    expected = {
        "images": (images, (n, *IMAGE_SHAPE)),
        "magnitudes": (magnitudes, (n, IMAGE_SHAPE[0])),
        "redshift": (redshift, (n,)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise DataFormatError(
                f"{path}: {name} has shape {tuple(tensor.shape)}; expected "
                f"{shape} (N galaxies, bands u, g, r, i, z)"
            )
        if not tensor.is_floating_point():
            raise DataFormatError(
                f"{path}: {name} has dtype {tensor.dtype}; expected float32"
            )
    return images, magnitudes, redshift


def count_rows(paths: Sequence[str | os.PathLike]) -> int:
    """Galaxies in the given paper files (memory-mapped: cheap even for large files)."""
    return sum(load_pt(p)[0].shape[0] for p in paths)


def import_pt(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    first_object_id: int = 1,
) -> dict[str, Any]:
    """Convert paper files, in order, into one galaxy file; return a summary.

    Object ids are ``first_object_id`` plus the running row number (the paper's files
    carry none). Images and magnitudes must be finite; an infinite redshift is refused,
    a NaN one means unknown.
    """
    started = time.perf_counter()
    loaded = [(Path(p), *load_pt(p)) for p in paths]
    if not loaded:
        raise DataFormatError("import-pt: no input files given")
    total = sum(images.shape[0] for _, images, _, _ in loaded)
    provenance = {
        "tool": f"cai {__version__} import-pt",
        "sources": [
            {
                "file": path.name,
                "sha256": sha256_file(path),
                "rows": int(images.shape[0]),
            }
            for path, images, _, _ in loaded
        ],
        "first_object_id": first_object_id,
    }
    row = 0
    with GalaxyWriter(out, total, provenance) as writer:
        for path, images, magnitudes, redshift in loaded:
            if images.dtype != torch.float32:
                _logger.warning(
                    "%s: tensors are %s, converted to float32 (the format's dtype)",
                    path,
                    images.dtype,
                )
            for start in range(0, images.shape[0], IMPORT_ROWS):
                stop = min(start + IMPORT_ROWS, images.shape[0])
                batch = GalaxyBatch(
                    object_id=np.arange(
                        first_object_id + row, first_object_id + row + stop - start
                    ),
                    image=images[start:stop].to(torch.float32).numpy(),
                    magnitudes=magnitudes[start:stop].to(torch.float32).numpy(),
                    redshift=redshift[start:stop].to(torch.float32).numpy(),
                )
                check_finite(batch, str(path), first_row=start)
                if np.isinf(batch.redshift).any():
                    bad = start + int(np.flatnonzero(np.isinf(batch.redshift))[0])
                    raise DataFormatError(
                        f"{path}: row {bad} has an infinite redshift; expected a finite "
                        "value or NaN (unknown)"
                    )
                writer.append(batch)
                row += stop - start
    seconds = time.perf_counter() - started
    size_mb = Path(out).stat().st_size / (1 << 20)
    _logger.info(
        "import-pt: %d files, %d galaxies, %.1f MiB, %.1f s -> %s",
        len(loaded),
        total,
        size_mb,
        seconds,
        out,
    )
    return {"files": len(loaded), "rows": total, "seconds": seconds, "mib": size_mb}
