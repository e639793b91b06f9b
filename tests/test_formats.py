"""Tests of the galaxy file format: round trip, atomic writes, determinism, bad input."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from cai.errors import DataFormatError
from cai.formats import (
    BANDS,
    FIELDS,
    FORMAT_NAME,
    FORMAT_VERSION,
    IMAGE_SHAPE,
    GalaxyBatch,
    GalaxyFile,
    GalaxyWriter,
    check_finite,
)
from cai.sky import simulate_chunk

SEED = 99


def batch_of(n: int, first_object_id: int = 1) -> GalaxyBatch:
    return simulate_chunk(n, SEED, 0, first_object_id)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_raw(
    path: Path,
    n: int = 4,
    attrs: dict | None = None,
    arrays: dict | None = None,
    drop: tuple[str, ...] = (),
) -> Path:
    """Write a galaxy file with h5py directly, changing attributes or datasets.

    ``attrs`` and ``arrays`` override the valid defaults (an attribute set to None is
    left out); ``drop`` names datasets to leave out.
    """
    default_attrs = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "bands": "".join(BANDS),
        "provenance": "{}",
    }
    default_arrays = {
        name: np.zeros((n, *shape), dtype=dtype)
        for name, (shape, dtype) in FIELDS.items()
    }
    default_arrays["object_id"] = np.arange(1, n + 1, dtype=np.int64)
    default_attrs.update(attrs or {})
    default_arrays.update(arrays or {})
    with h5py.File(path, "w") as h5:
        for key, value in default_attrs.items():
            if value is not None:
                h5.attrs[key] = value
        for name, array in default_arrays.items():
            if name not in drop:
                h5.create_dataset(name, data=array)
    return path


def assert_batches_equal(a: GalaxyBatch, b: GalaxyBatch) -> None:
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


# --------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------


def test_round_trip_values_provenance_and_attributes(tmp_path: Path) -> None:
    batch = batch_of(20, first_object_id=500)
    batch.redshift[3] = np.nan  # unknown redshift is allowed and kept
    provenance = {"tool": "test", "seed": SEED, "nested": {"list": [1, 2, 3]}}
    path = tmp_path / "g.h5"
    with GalaxyWriter(path, 20, provenance) as writer:
        writer.append(
            GalaxyBatch(*(getattr(batch, f)[:12] for f in FIELDS))  # two appends
        )
        writer.append(GalaxyBatch(*(getattr(batch, f)[12:] for f in FIELDS)))

    with h5py.File(path, "r") as h5:
        assert h5.attrs["format"] == FORMAT_NAME
        assert h5.attrs["format_version"] == FORMAT_VERSION
        assert h5.attrs["bands"] == "ugriz"
        assert json.loads(h5.attrs["provenance"]) == provenance

    with GalaxyFile(path) as galaxies:
        assert len(galaxies) == 20
        assert galaxies.provenance == provenance
        whole = galaxies.read(0, 20)
        assert_batches_equal(whole, batch)
        assert whole.image.shape == (20, *IMAGE_SHAPE)
        assert np.isnan(whole.redshift[3])
        # A read past the end is cut to the rows there are.
        assert len(galaxies.read(15, 100)) == 5
        starts = [start for start, _ in galaxies.iter_batches(7)]
        assert starts == [0, 7, 14]
        parts = [b for _, b in galaxies.iter_batches(7)]
        assert [len(b) for b in parts] == [7, 7, 6]
        np.testing.assert_array_equal(
            np.concatenate([b.image for b in parts]), batch.image
        )


def test_zero_row_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "empty.h5"
    with GalaxyWriter(path, 0, {"tool": "test"}):
        pass
    with GalaxyFile(path) as galaxies:
        assert len(galaxies) == 0
        assert list(galaxies.iter_batches(10)) == []


def test_negative_row_count_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rows must be >= 0"):
        GalaxyWriter(tmp_path / "g.h5", -1, {})


# --------------------------------------------------------------------------------------
# Atomic writes and determinism
# --------------------------------------------------------------------------------------


def test_exception_inside_with_leaves_no_file_and_no_temp_file(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    with (
        pytest.raises(RuntimeError, match="boom"),
        GalaxyWriter(folder / "g.h5", 10, {}) as writer,
    ):
        writer.append(batch_of(5))
        raise RuntimeError("boom")
    assert list(folder.iterdir()) == []


def test_fewer_rows_than_declared_raises_and_leaves_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    path = folder / "g.h5"
    with (
        pytest.raises(DataFormatError, match="only 5 of 10 declared rows") as info,
        GalaxyWriter(path, 10, {}) as writer,
    ):
        writer.append(batch_of(5))
    assert str(path) in str(info.value)
    assert list(folder.iterdir()) == []


def test_more_rows_than_declared_raises_and_leaves_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    path = folder / "g.h5"
    with (
        pytest.raises(DataFormatError, match="declared with 4") as info,
        GalaxyWriter(path, 4, {}) as writer,
    ):
        writer.append(batch_of(5))
    assert str(path) in str(info.value)
    assert list(folder.iterdir()) == []


def test_append_of_wrong_dtype_is_refused_naming_the_field(tmp_path: Path) -> None:
    batch = batch_of(3)
    batch.image = batch.image.astype(np.float64)
    folder = tmp_path / "out"
    with (
        pytest.raises(DataFormatError, match=r"field 'image'.*float64.*float32"),
        GalaxyWriter(folder / "g.h5", 3, {}) as writer,
    ):
        writer.append(batch)
    assert list(folder.iterdir()) == []


def test_same_input_written_twice_gives_identical_bytes(tmp_path: Path) -> None:
    """No timestamps in the file: a second later, the same input gives the same sha256."""
    batch = batch_of(30)
    paths = [tmp_path / "a.h5", tmp_path / "b.h5"]
    for number, path in enumerate(paths):
        if number:
            time.sleep(1.1)  # HDF5 timestamps have one-second resolution
        with GalaxyWriter(path, 30, {"tool": "test", "seed": SEED}) as writer:
            writer.append(batch)
    assert sha256(paths[0]) == sha256(paths[1])


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nothing.h5"
    with pytest.raises(DataFormatError, match="no such file") as info:
        GalaxyFile(path)
    assert str(path) in str(info.value)


def test_truncated_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "g.h5"
    with GalaxyWriter(path, 40, {}) as writer:
        writer.append(batch_of(40))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError) as info, GalaxyFile(path) as galaxies:
        galaxies.read(0, len(galaxies))
    message = str(info.value)
    assert str(path) in message
    assert "expected a CAI galaxy file" in message or "truncated" in message


def test_random_bytes_are_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "noise.h5"
    path.write_bytes(np.random.default_rng(0).bytes(50_000))
    with pytest.raises(DataFormatError, match="not a readable HDF5 file") as info:
        GalaxyFile(path)
    assert str(path) in str(info.value)
    assert "expected a CAI galaxy file" in str(info.value)


def test_raw_writer_makes_a_valid_file(tmp_path: Path) -> None:
    """The helper's defaults are valid, so each bad case below differs in one thing."""
    with GalaxyFile(write_raw(tmp_path / "ok.h5")) as galaxies:
        assert len(galaxies) == 4


BAD_FILES = {
    "missing dataset": (
        {"drop": ("magnitudes",)},
        r"dataset 'magnitudes' is missing",
    ),
    "wrong image shape": (
        {"arrays": {"image": np.zeros((4, 5, 16, 16), np.float32)}},
        r"dataset 'image' has shape \(4, 5, 16, 16\).*expected \(rows, 5, 32, 32\)",
    ),
    "wrong band count": (
        {"arrays": {"magnitudes": np.zeros((4, 3), np.float32)}},
        r"dataset 'magnitudes' has shape \(4, 3\).*expected \(rows, 5\)",
    ),
    "wrong dtype": (
        {"arrays": {"image": np.zeros((4, *IMAGE_SHAPE), np.float64)}},
        r"dataset 'image' .*dtype float64; expected .*float32",
    ),
    "scalar dataset": (
        {"arrays": {"object_id": np.int64(7)}},
        r"dataset 'object_id' has shape \(\)",
    ),
    "wrong format attribute": (
        {"attrs": {"format": "something-else"}},
        r"attribute 'format' is 'something-else'; expected 'cai-galaxies'",
    ),
    "missing format attribute": (
        {"attrs": {"format": None}},
        r"attribute 'format' is None; expected 'cai-galaxies'",
    ),
    "wrong format version": (
        {"attrs": {"format_version": 99}},
        r"format_version 99; this reader reads 1",
    ),
    "wrong band order": (
        {"attrs": {"bands": "zirgu"}},
        r"band order 'zirgu'; expected 'ugriz'",
    ),
    "mismatched row counts": (
        {"arrays": {"redshift": np.zeros(3, np.float32)}},
        r"dataset 'redshift' has 3 rows; 'object_id' has 4",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_refused_naming_file_and_expectation(
    tmp_path: Path, case: str
) -> None:
    changes, expected = BAD_FILES[case]
    path = write_raw(tmp_path / "bad.h5", **changes)
    with pytest.raises(DataFormatError, match=expected) as info:
        GalaxyFile(path)
    assert str(path) in str(info.value)


def test_check_finite_names_row_and_object_id_of_a_nan_pixel() -> None:
    batch = batch_of(10, first_object_id=1000)
    batch.image[6, 2, 10, 11] = np.nan
    with pytest.raises(DataFormatError) as info:
        check_finite(batch, "part.h5", first_row=200)
    message = str(info.value)
    assert message.startswith("part.h5:")
    assert "row 206 (object_id 1006)" in message
    assert "'image'" in message
    assert "expected finite values" in message


def test_check_finite_names_an_infinite_magnitude() -> None:
    batch = batch_of(10)
    batch.magnitudes[4, 0] = np.inf
    with pytest.raises(DataFormatError, match=r"row 4 \(object_id 5\).*'magnitudes'"):
        check_finite(batch, "x.h5")


def test_check_finite_reports_the_first_bad_row_and_allows_nan_redshift() -> None:
    batch = batch_of(10)
    batch.redshift[:] = np.nan
    check_finite(batch, "x.h5")  # unknown redshifts are not an input error
    batch.image[8, 0, 0, 0] = -np.inf
    batch.image[3, 4, 31, 31] = np.nan
    with pytest.raises(DataFormatError, match=r"row 3 \(object_id 4\)"):
        check_finite(batch, "x.h5")
