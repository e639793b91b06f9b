"""Tests of partition arithmetic, partition files and their manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cai.atomic import sha256_file
from cai.errors import DataFormatError
from cai.formats import BYTES_PER_GALAXY, FIELDS, GalaxyFile
from cai.partition import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    PARTITION_METADATA_BYTES,
    partition_count,
    partition_dataset,
    read_manifest,
    rows_per_partition,
)

MIB = 1 << 20
SIZE_MB = 0.11  # floor((0.11 MiB - 4 KiB) / 20,504 B) = 5 galaxies per partition
ROWS = 23  # -> partitions of 5, 5, 5, 5 and 3


def read_all(path: Path) -> dict[str, np.ndarray]:
    with GalaxyFile(path) as galaxies:
        batch = galaxies.read(0, len(galaxies))
    return {name: getattr(batch, name) for name in FIELDS}


# --------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------


# floor((size_mb * 2**20 - 4096) / 20504), the definition in partition.py and
# config.yaml, which gives the design's counts:
# 25 MiB: (26,214,400 - 4,096) / 20,504 = 1278.30 -> 1278
# 50 MiB: (52,428,800 - 4,096) / 20,504 = 2556.80 -> 2556
# 75 MiB: (78,643,200 - 4,096) / 20,504 = 3835.31 -> 3835
# 100 MiB: (104,857,600 - 4,096) / 20,504 = 5113.81 -> 5113
@pytest.mark.parametrize(
    ("size_mb", "rows"), [(25, 1278), (50, 2556), (75, 3835), (100, 5113)]
)
def test_rows_per_partition_at_the_papers_sizes(size_mb: float, rows: int) -> None:
    assert rows_per_partition(size_mb) == rows
    # The defining property: the rows and the metadata allowance fit in the size, and
    # one more galaxy would not.
    budget = size_mb * MIB - PARTITION_METADATA_BYTES
    assert rows * BYTES_PER_GALAXY <= budget < (rows + 1) * BYTES_PER_GALAXY


def test_rows_per_partition_of_a_small_size() -> None:
    assert rows_per_partition(SIZE_MB) == 5
    assert rows_per_partition((BYTES_PER_GALAXY + PARTITION_METADATA_BYTES) / MIB) == 1


@pytest.mark.parametrize("size_mb", [0.01, 0.0, -5.0])
def test_size_smaller_than_one_galaxy_is_refused(size_mb: float) -> None:
    with pytest.raises(ValueError, match="holds no galaxy") as info:
        rows_per_partition(size_mb)
    message = str(info.value)
    assert f"{BYTES_PER_GALAXY} B" in message
    assert "must be at least 0.02346 MB" in message


@pytest.mark.parametrize(
    ("total", "size_mb", "count"),
    [
        (0, 25, 0),
        (1, 25, 1),
        (1278, 25, 1),
        (1279, 25, 2),
        (10_000, 75, 3),
        (ROWS, SIZE_MB, 5),
    ],
)
def test_partition_count(total: int, size_mb: float, count: int) -> None:
    assert partition_count(total, size_mb) == count


def test_partition_count_refuses_a_size_below_one_galaxy() -> None:
    with pytest.raises(ValueError, match="holds no galaxy"):
        partition_count(100, 0.001)


# --------------------------------------------------------------------------------------
# partition_dataset
# --------------------------------------------------------------------------------------


def test_partitions_keep_every_row_in_order(galaxy_file, tmp_path: Path) -> None:
    source = galaxy_file(ROWS, first_object_id=100)
    out = tmp_path / "parts"
    manifest = partition_dataset(source, out, SIZE_MB)

    entries = manifest["partitions"]
    assert [e["rows"] for e in entries] == [5, 5, 5, 5, 3]  # last holds the rest
    assert [e["first_row"] for e in entries] == [0, 5, 10, 15, 20]
    parts = [read_all(out / e["path"]) for e in entries]
    whole = read_all(source)
    for name in FIELDS:
        joined = np.concatenate([p[name] for p in parts])
        np.testing.assert_array_equal(joined, whole[name])
    np.testing.assert_array_equal(whole["object_id"], np.arange(100, 100 + ROWS))

    with GalaxyFile(out / entries[1]["path"]) as galaxies:
        provenance = galaxies.provenance
    assert provenance["rows"] == [5, 10]
    assert provenance["source"] == source.name
    assert provenance["source_sha256"] == sha256_file(source)
    assert provenance["partition_size_mb"] == SIZE_MB


def test_manifest_fields_match_the_files(galaxy_file, tmp_path: Path) -> None:
    source = galaxy_file(ROWS)
    out = tmp_path / "parts"
    manifest = partition_dataset(source, out, SIZE_MB)

    assert manifest["format"] == MANIFEST_FORMAT
    assert manifest["format_version"] == 1
    assert manifest["source"] == source.name
    assert manifest["source_sha256"] == sha256_file(source)
    assert manifest["partition_size_mb"] == SIZE_MB
    assert manifest["rows_per_partition"] == 5
    assert manifest["total_rows"] == ROWS
    assert json.loads((out / MANIFEST_NAME).read_text()) == manifest

    files = sorted(p.name for p in out.iterdir())
    assert files == [MANIFEST_NAME] + [f"part-{i:05d}.h5" for i in range(5)]
    for index, entry in enumerate(manifest["partitions"]):
        path = out / entry["path"]
        assert entry["id"] == f"part-{index:05d}"
        assert entry["path"] == f"part-{index:05d}.h5"  # relative to the manifest
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == sha256_file(path)
        with GalaxyFile(path) as galaxies:
            assert len(galaxies) == entry["rows"]
    # Nothing but the source and the finished folder is left beside them.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["galaxies.h5", "parts"]


def test_read_manifest_makes_paths_absolute(galaxy_file, tmp_path: Path) -> None:
    out = tmp_path / "parts"
    partition_dataset(galaxy_file(ROWS), out, SIZE_MB)
    from_folder = read_manifest(out)
    from_file = read_manifest(out / MANIFEST_NAME)
    assert from_folder == from_file
    for entry in from_folder["partitions"]:
        path = Path(entry["path"])
        assert path.is_absolute()
        assert path == (out / path.name).resolve()
        assert sha256_file(path) == entry["sha256"]


def test_a_size_larger_than_the_data_makes_one_partition(
    galaxy_file, tmp_path: Path
) -> None:
    manifest = partition_dataset(galaxy_file(ROWS), tmp_path / "parts", 25)
    assert [e["rows"] for e in manifest["partitions"]] == [ROWS]


def test_partitioning_is_deterministic(galaxy_file, tmp_path: Path) -> None:
    source = galaxy_file(ROWS)
    first = partition_dataset(source, tmp_path / "one", SIZE_MB)
    second = partition_dataset(source, tmp_path / "two", SIZE_MB)
    shas = [e["sha256"] for e in first["partitions"]]
    assert shas == [e["sha256"] for e in second["partitions"]]
    assert len(set(shas)) == len(shas)
    assert sha256_file(tmp_path / "one" / MANIFEST_NAME) == sha256_file(
        tmp_path / "two" / MANIFEST_NAME
    )


def test_refuses_a_non_empty_output_folder(galaxy_file, tmp_path: Path) -> None:
    source = galaxy_file(ROWS)
    out = tmp_path / "parts"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataFormatError, match="not an empty folder") as info:
        partition_dataset(source, out, SIZE_MB)
    assert str(out) in str(info.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"


def test_refuses_a_file_in_place_of_the_output_folder(
    galaxy_file, tmp_path: Path
) -> None:
    source = galaxy_file(ROWS)
    out = tmp_path / "parts"
    out.write_text("not a folder")
    with pytest.raises(DataFormatError, match="not an empty folder"):
        partition_dataset(source, out, SIZE_MB)
    assert out.read_text() == "not a folder"


def test_accepts_an_existing_empty_output_folder(galaxy_file, tmp_path: Path) -> None:
    out = tmp_path / "parts"
    out.mkdir()
    manifest = partition_dataset(galaxy_file(ROWS), out, SIZE_MB)
    assert len(manifest["partitions"]) == 5


def test_a_bad_source_leaves_no_output_folder(tmp_path: Path) -> None:
    source = tmp_path / "noise.h5"
    source.write_bytes(b"\x00not hdf5" * 100)
    with pytest.raises(DataFormatError) as info:
        partition_dataset(source, tmp_path / "parts", SIZE_MB)
    assert str(source) in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["noise.h5"]


def test_a_missing_source_is_a_format_error_naming_it(tmp_path: Path) -> None:
    source = tmp_path / "absent.h5"
    with pytest.raises(DataFormatError, match="no such file") as info:
        partition_dataset(source, tmp_path / "parts", SIZE_MB)
    assert str(source) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_size_below_one_galaxy_writes_nothing(galaxy_file, tmp_path: Path) -> None:
    source = galaxy_file(ROWS)
    with pytest.raises(ValueError, match="holds no galaxy"):
        partition_dataset(source, tmp_path / "parts", 0.01)
    assert not (tmp_path / "parts").exists()


# --------------------------------------------------------------------------------------
# read_manifest errors
# --------------------------------------------------------------------------------------

GOOD_MANIFEST = {
    "format": MANIFEST_FORMAT,
    "format_version": 1,
    "partition_size_mb": 25,
    "partitions": [
        {
            "id": "part-00000",
            "path": "part-00000.h5",
            "rows": 3,
            "bytes": 10,
            "sha256": "0" * 64,
        },
    ],
}


def without_entry_key(key: str) -> dict:
    manifest = json.loads(json.dumps(GOOD_MANIFEST))
    del manifest["partitions"][0][key]
    return manifest


BAD_MANIFESTS = {
    "bad JSON": ('{"format": "cai-manifest", ', r"not valid JSON"),
    "wrong format": (
        {**GOOD_MANIFEST, "format": "other"},
        r"'format' is 'other'; expected 'cai-manifest'",
    ),
    "no format": (
        {k: v for k, v in GOOD_MANIFEST.items() if k != "format"},
        r"'format' is None; expected 'cai-manifest'",
    ),
    "not an object": ([1, 2, 3], r"expected 'cai-manifest'"),
    "no partitions": (
        {k: v for k, v in GOOD_MANIFEST.items() if k != "partitions"},
        r"'partitions'",
    ),
    **{
        f"missing {key}": (without_entry_key(key), rf"partition 0 has no '{key}'")
        for key in ("id", "path", "rows", "bytes", "sha256")
    },
}


def test_good_manifest_literal_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / MANIFEST_NAME
    path.write_text(json.dumps(GOOD_MANIFEST))
    manifest = read_manifest(path)
    assert manifest["partitions"][0]["path"] == str(tmp_path / "part-00000.h5")


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_bad_manifest_is_refused_naming_the_file(tmp_path: Path, case: str) -> None:
    content, expected = BAD_MANIFESTS[case]
    path = tmp_path / MANIFEST_NAME
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataFormatError, match=expected) as info:
        read_manifest(path)
    assert str(path) in str(info.value)


def test_missing_manifest_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="manifest not found") as info:
        read_manifest(tmp_path / "nowhere.json")
    assert str(tmp_path / "nowhere.json") in str(info.value)
    with pytest.raises(DataFormatError, match="manifest not found") as info:
        read_manifest(tmp_path)  # a folder without a manifest
    assert str(tmp_path / MANIFEST_NAME) in str(info.value)
