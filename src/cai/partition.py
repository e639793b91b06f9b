"""Split a galaxy file into partition files of a target size, and write their manifest.

Sizes are MiB (2^20 B) counted in galaxies of 20,504 B as the paper counts them (image,
magnitudes and redshift), after a fixed 4 KiB allowance for the file's own metadata:
a partition of ``size_mb`` holds ``floor((size_mb * 2**20 - 4096) / 20504)`` galaxies.
So 25, 50, 75 and 100 MB hold 1,278, 2,556, 3,835 and 5,113 galaxies, the counts of the
design (the paper's own 75 MB files hold 3,834). Without the allowance, 50 and 100 MB
would give 2,557 and 5,114 (their galaxies alone would fill the size to within 72 and
144 bytes). The last partition holds the rest. The manifest is what every later step
reads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai import __version__
from cai.atomic import UMASK, sha256_file, write_json
from cai.errors import DataFormatError
from cai.formats import BYTES_PER_GALAXY, GalaxyFile, GalaxyWriter

_logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "cai-manifest"
MANIFEST_VERSION = 1
MIB = 1 << 20
PARTITION_METADATA_BYTES = 4096  # B of a partition's size left for file metadata
MANIFEST_NAME = "manifest.json"
COPY_ROWS = 1024  # rows copied at a time: 20 MiB of memory whatever the size


def rows_per_partition(size_mb: float) -> int:
    """Galaxies in a partition of ``size_mb`` MiB; at least one, else ValueError."""
    rows = math.floor((size_mb * MIB - PARTITION_METADATA_BYTES) / BYTES_PER_GALAXY)
    if rows < 1:
        smallest = (PARTITION_METADATA_BYTES + BYTES_PER_GALAXY) / MIB
        raise ValueError(
            f"partition size {size_mb} MB holds no galaxy: one galaxy is "
            f"{BYTES_PER_GALAXY} B plus {PARTITION_METADATA_BYTES} B of file metadata, "
            f"so the size must be at least {smallest:.5f} MB"
        )
    return rows


def partition_count(total_rows: int, size_mb: float) -> int:
    """How many partitions ``total_rows`` galaxies make at ``size_mb`` MiB each."""
    return math.ceil(total_rows / rows_per_partition(size_mb))


def partition_name(index: int) -> str:
    return f"part-{index:05d}"


def partition_dataset(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    size_mb: float,
) -> dict[str, Any]:
    """Write ``out_dir/part-NNNNN.h5`` and ``out_dir/manifest.json``; return the manifest.

    The folder is built under a temporary name and renamed when complete, so it exists
    only whole. Deterministic: the same source and size give byte-identical files.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise DataFormatError(
                f"{out_dir}: already exists and is not an empty folder; remove it first"
            )
        out_dir.rmdir()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    rows = rows_per_partition(size_mb)
    entries = []
    with (
        tempfile.TemporaryDirectory(
            prefix=f".{out_dir.name}.", dir=out_dir.parent
        ) as tmp,
        GalaxyFile(source) as src,
    ):
        source_sha = sha256_file(source)
        total = len(src)
        count = math.ceil(total / rows)
        for index in range(count):
            start, stop = index * rows, min((index + 1) * rows, total)
            name = f"{partition_name(index)}.h5"
            provenance = {
                "tool": f"cai {__version__} partition",
                "source": Path(source).name,
                "source_sha256": source_sha,
                "rows": [start, stop],
                "partition_size_mb": size_mb,
            }
            with GalaxyWriter(Path(tmp) / name, stop - start, provenance) as writer:
                for first in range(start, stop, COPY_ROWS):
                    writer.append(src.read(first, min(first + COPY_ROWS, stop)))
            entries.append(
                {
                    "id": partition_name(index),
                    "path": name,
                    "rows": stop - start,
                    "first_row": start,
                    "bytes": (Path(tmp) / name).stat().st_size,
                    "sha256": sha256_file(Path(tmp) / name),
                }
            )
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "source": Path(source).name,
            "source_sha256": source_sha,
            "partition_size_mb": size_mb,
            "rows_per_partition": rows,
            "total_rows": total,
            "partitions": entries,
        }
        write_json(Path(tmp) / MANIFEST_NAME, manifest)
        os.chmod(tmp, 0o777 & ~UMASK)
        os.rename(tmp, out_dir)
    seconds = time.perf_counter() - started
    size = sum(e["bytes"] for e in entries) / MIB
    _logger.info(
        "partition: %d galaxies -> %d partitions of %g MB (%d rows each), %.1f MiB, "
        "%.1f s -> %s",
        total,
        count,
        size_mb,
        rows,
        size,
        seconds,
        out_dir,
    )
    return manifest


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Load and check a manifest (or the folder holding one); paths made absolute."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataFormatError(f"{path}: manifest not found") from None
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: not valid JSON ({err})") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != MANIFEST_FORMAT:
        raise DataFormatError(
            f"{path}: 'format' is {fmt!r}; expected {MANIFEST_FORMAT!r}"
        )
    if not isinstance(manifest.get("partitions"), list):
        raise DataFormatError(f"{path}: has no 'partitions' list")
    for number, entry in enumerate(manifest["partitions"]):
        for key in ("id", "path", "rows", "bytes", "sha256"):
            if key not in entry:
                raise DataFormatError(f"{path}: partition {number} has no '{key}'")
        entry["path"] = str((path.parent / entry["path"]).resolve())
    return manifest


@dataclass(frozen=True)
class PartitionRef:
    """A partition to predict: its id, the file it reads, rows and checksum.

    ``source`` names the physical partition when the file is shared with other
    partitions of the plan (cyclic reuse), else it is None.
    """

    id: str
    path: str
    rows: int
    sha256: str | None = None
    source: str | None = None

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> PartitionRef:
        return cls(entry["id"], entry["path"], int(entry["rows"]), entry.get("sha256"))


def planned_partitions(
    manifest: dict[str, Any],
    indices: range | list[int] | None = None,
    logical: int | None = None,
) -> list[PartitionRef]:
    """Partitions of a plan over a manifest, as the engine and the aggregation see them.

    Logical partition i reads physical partition i mod (manifest partitions); with
    ``logical`` larger than the manifest, files are reused and each ref names its
    ``source``. ``indices`` selects logical partitions (default: all ``logical``).
    """
    entries = manifest["partitions"]
    logical = len(entries) if logical is None else logical
    indices = range(logical) if indices is None else indices
    shared = logical > len(entries)
    refs = []
    for index in indices:
        if not 0 <= index < logical:
            raise DataFormatError(
                f"partition index {index} is outside the plan of {logical} partitions"
            )
        entry = entries[index % len(entries)]
        refs.append(
            PartitionRef(
                partition_name(index),
                entry["path"],
                int(entry["rows"]),
                entry.get("sha256"),
                entry["id"] if shared else None,
            )
        )
    return refs
