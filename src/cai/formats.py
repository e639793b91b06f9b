"""The galaxy file format: HDF5, one dataset per field, chunked along rows.

One galaxy is ``object_id`` (int64), ``image`` float32 [5, 32, 32] in band order u, g,
r, i, z, ``magnitudes`` float32 [5] and ``redshift`` float32 (NaN when unknown). The same
format holds a whole data set (``cai simulate``, ``cai import-pt``) and each partition
(``cai partition``). File attributes carry the format name and version, the band order
and a JSON provenance record.

Files are written under a temporary name and renamed when complete, and written without
HDF5 timestamps, so the same input always gives the same bytes (and checksum).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cai.atomic import atomic_path
from cai.errors import DataFormatError

FORMAT_NAME = "cai-galaxies"
FORMAT_VERSION = 1
BANDS = ("u", "g", "r", "i", "z")
IMAGE_SHAPE = (len(BANDS), 32, 32)
# Bytes of one galaxy as the paper counts them: image + magnitudes + redshift, float32.
BYTES_PER_GALAXY = (int(np.prod(IMAGE_SHAPE)) + len(BANDS) + 1) * 4  # 20,504 B
# Bits the paper's throughput counts per galaxy: image + magnitudes (no redshift).
INPUT_BITS_PER_GALAXY = (int(np.prod(IMAGE_SHAPE)) + len(BANDS)) * 32  # 164,000 bit
CHUNK_ROWS = 256  # HDF5 chunk along rows: 256 images = 5 MiB

FIELDS: dict[str, tuple[tuple[int, ...], np.dtype]] = {
    "object_id": ((), np.dtype("int64")),
    "image": (IMAGE_SHAPE, np.dtype("float32")),
    "magnitudes": ((len(BANDS),), np.dtype("float32")),
    "redshift": ((), np.dtype("float32")),
}


@dataclass
class GalaxyBatch:
    """A block of consecutive galaxies, one numpy array per field."""

    object_id: np.ndarray
    image: np.ndarray
    magnitudes: np.ndarray
    redshift: np.ndarray

    def __len__(self) -> int:
        return len(self.object_id)

    def check(self, where: str) -> None:
        """Raise DataFormatError unless shapes and dtypes are those of the format."""
        n = len(self.object_id)
        for name, (shape, dtype) in FIELDS.items():
            array = getattr(self, name)
            if array.shape != (n, *shape) or array.dtype != dtype:
                raise DataFormatError(
                    f"{where}: field '{name}' has shape {array.shape} and dtype "
                    f"{array.dtype}; expected ({n}, {', '.join(map(str, shape))}) {dtype}"
                )


def check_finite(batch: GalaxyBatch, where: str, first_row: int = 0) -> None:
    """Raise DataFormatError naming the first galaxy with a NaN or infinite input value."""
    for name in ("image", "magnitudes"):
        values = getattr(batch, name)
        finite = np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            raise DataFormatError(
                f"{where}: row {first_row + bad} (object_id {int(batch.object_id[bad])}) "
                f"has NaN or infinite values in '{name}'; expected finite values"
            )


class GalaxyWriter:
    """Write exactly ``rows`` galaxies to ``path``, atomically.

    Use as a context manager and call :meth:`append` until ``rows`` galaxies are
    written; the file appears under its final name only if all rows arrived.
    """

    def __init__(self, path: str | os.PathLike, rows: int, provenance: dict[str, Any]):
        if rows < 0:
            raise ValueError(f"rows must be >= 0, got {rows}")
        self.path = Path(path)
        self.rows = rows
        self.provenance = provenance
        self.written = 0

    def __enter__(self) -> GalaxyWriter:
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        self._h5 = h5py.File(tmp, "w", track_order=True)
        self._h5.attrs["format"] = FORMAT_NAME
        self._h5.attrs["format_version"] = FORMAT_VERSION
        self._h5.attrs["bands"] = "".join(BANDS)
        self._h5.attrs["provenance"] = json.dumps(self.provenance, sort_keys=True)
        chunk_rows = max(1, min(CHUNK_ROWS, self.rows))
        for name, (shape, dtype) in FIELDS.items():
            self._h5.create_dataset(
                name,
                shape=(self.rows, *shape),
                dtype=dtype,
                chunks=(chunk_rows, *shape) if self.rows else None,
                track_times=False,
            )
        return self

    def append(self, batch: GalaxyBatch) -> None:
        batch.check(f"{self.path} (writing rows from {self.written})")
        stop = self.written + len(batch)
        if stop > self.rows:
            raise DataFormatError(
                f"{self.path}: {stop} rows written; the file was declared with {self.rows}"
            )
        for name in FIELDS:
            self._h5[name][self.written : stop] = getattr(batch, name)
        self.written = stop

    def __exit__(self, exc_type, exc, tb) -> None:
        self._h5.close()
        if exc_type is None and self.written != self.rows:
            exc = DataFormatError(
                f"{self.path}: only {self.written} of {self.rows} declared rows written"
            )
            self._atomic.__exit__(type(exc), exc, None)
            raise exc
        self._atomic.__exit__(exc_type, exc, tb)


class GalaxyFile:
    """Read a galaxy file, checking its format first; use as a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._h5 = h5py.File(self.path, "r")
        except FileNotFoundError:
            raise DataFormatError(f"{self.path}: no such file") from None
        except OSError as err:
            raise DataFormatError(
                f"{self.path}: not a readable HDF5 file ({err}); expected a CAI galaxy "
                "file written by 'cai simulate', 'cai import-pt' or 'cai partition'"
            ) from None
        try:
            self._check()
        except Exception:
            self._h5.close()
            raise

    def _check(self) -> None:
        fmt = self._h5.attrs.get("format")
        if fmt != FORMAT_NAME:
            raise DataFormatError(
                f"{self.path}: attribute 'format' is {fmt!r}; expected {FORMAT_NAME!r}"
            )
        version = int(self._h5.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise DataFormatError(
                f"{self.path}: format_version {version}; this reader reads "
                f"{FORMAT_VERSION}"
            )
        bands = self._h5.attrs.get("bands")
        if bands != "".join(BANDS):
            raise DataFormatError(
                f"{self.path}: band order {bands!r}; expected {''.join(BANDS)!r}"
            )
        rows = None
        for name, (shape, dtype) in FIELDS.items():
            if name not in self._h5:
                raise DataFormatError(f"{self.path}: dataset '{name}' is missing")
            dset = self._h5[name]
            if (
                dset.ndim != 1 + len(shape)
                or dset.shape[1:] != shape
                or dset.dtype != dtype
            ):
                raise DataFormatError(
                    f"{self.path}: dataset '{name}' has shape {dset.shape} and dtype "
                    f"{dset.dtype}; expected (rows, {', '.join(map(str, shape))}) {dtype}"
                )
            if rows is not None and dset.shape[0] != rows:
                raise DataFormatError(
                    f"{self.path}: dataset '{name}' has {dset.shape[0]} rows; "
                    f"'object_id' has {rows}"
                )
            rows = dset.shape[0]
        self.rows = int(rows)

    @property
    def provenance(self) -> dict[str, Any]:
        return json.loads(self._h5.attrs.get("provenance", "{}"))

    def __len__(self) -> int:
        return self.rows

    def read(self, start: int, stop: int) -> GalaxyBatch:
        """Rows ``start:stop`` as a GalaxyBatch (a short read is a format error)."""
        stop = min(stop, self.rows)
        try:
            arrays = {name: self._h5[name][start:stop] for name in FIELDS}
        except OSError as err:
            raise DataFormatError(
                f"{self.path}: rows {start}-{stop} cannot be read ({err}); the file is "
                "truncated or corrupt: regenerate it"
            ) from None
        return GalaxyBatch(**arrays)

    def read_fields(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Whole columns ``names`` of the file, one read each (for the catalogue
        columns, without the images)."""
        unknown = [name for name in names if name not in FIELDS]
        if unknown:
            raise ValueError(f"unknown fields {unknown}; the format has {list(FIELDS)}")
        try:
            return {name: self._h5[name][:] for name in names}
        except OSError as err:
            raise DataFormatError(
                f"{self.path}: fields {', '.join(names)} cannot be read ({err}); the "
                "file is truncated or corrupt: regenerate it"
            ) from None

    def iter_batches(self, batch_size: int) -> Iterator[tuple[int, GalaxyBatch]]:
        """Yield ``(first_row, batch)`` over the file, ``batch_size`` rows at a time."""
        for start in range(0, self.rows, batch_size):
            yield start, self.read(start, start + batch_size)

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> GalaxyFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
