"""Tests of importing the paper's .pt partitions: values, ids, bad and hostile files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from cai.atomic import sha256_file
from cai.errors import DataFormatError
from cai.formats import GalaxyFile
from cai.importpt import count_rows, import_pt, load_pt
from cai.sky import simulate_chunk


def paper_tensors(n: int, seed: int = 5) -> tuple[torch.Tensor, ...]:
    """images [n, 5, 32, 32], magnitudes [n, 5], redshift [n], float32."""
    batch = simulate_chunk(n, seed, 0, 1)
    return (
        torch.from_numpy(batch.image.copy()),
        torch.from_numpy(batch.magnitudes.copy()),
        torch.from_numpy(batch.redshift.copy()),
    )


def save_pt(path: Path, *tensors: torch.Tensor) -> Path:
    """Save as the paper does: torch.save(TensorDataset(images, magnitudes, z)).

    The tensors are set after construction so that mismatched lengths, which
    TensorDataset's constructor refuses, can be saved too.
    """
    dataset = TensorDataset(torch.zeros(1))
    dataset.tensors = tuple(tensors)
    torch.save(dataset, path)
    return path


def folder_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class Hostile:
    """Pickles to a call of os.system: loading it unsafely would run a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------------------
# Good files
# --------------------------------------------------------------------------------------


def test_import_preserves_values_order_and_object_ids(tmp_path: Path) -> None:
    first = paper_tensors(7, seed=1)
    second = paper_tensors(5, seed=2)
    paths = [save_pt(tmp_path / "a.pt", *first), save_pt(tmp_path / "b.pt", *second)]
    out = tmp_path / "out.h5"

    summary = import_pt(paths, out, first_object_id=1000)

    assert summary["files"] == 2
    assert summary["rows"] == 12
    with GalaxyFile(out) as galaxies:
        assert len(galaxies) == 12
        batch = galaxies.read(0, 12)
        provenance = galaxies.provenance
    np.testing.assert_array_equal(batch.object_id, np.arange(1000, 1012))
    for got, index in (
        (batch.image, 0),
        (batch.magnitudes, 1),
        (batch.redshift, 2),
    ):
        expected = torch.cat([first[index], second[index]]).numpy()
        np.testing.assert_array_equal(got, expected)
    assert provenance["first_object_id"] == 1000
    assert provenance["sources"] == [
        {"file": "a.pt", "sha256": sha256_file(paths[0]), "rows": 7},
        {"file": "b.pt", "sha256": sha256_file(paths[1]), "rows": 5},
    ]


def test_default_first_object_id_is_one(tmp_path: Path) -> None:
    path = save_pt(tmp_path / "a.pt", *paper_tensors(4))
    import_pt([path], tmp_path / "out.h5")
    with GalaxyFile(tmp_path / "out.h5") as galaxies:
        np.testing.assert_array_equal(galaxies.read(0, 4).object_id, [1, 2, 3, 4])


def test_nan_redshift_is_kept_as_unknown(tmp_path: Path) -> None:
    images, magnitudes, redshift = paper_tensors(6)
    redshift[2] = float("nan")
    path = save_pt(tmp_path / "a.pt", images, magnitudes, redshift)
    import_pt([path], tmp_path / "out.h5")
    with GalaxyFile(tmp_path / "out.h5") as galaxies:
        z = galaxies.read(0, 6).redshift
    assert np.isnan(z[2])
    assert np.isfinite(np.delete(z, 2)).all()


def test_redshift_of_shape_n_by_1_is_accepted(tmp_path: Path) -> None:
    images, magnitudes, redshift = paper_tensors(3)
    path = save_pt(tmp_path / "a.pt", images, magnitudes, redshift[:, None])
    assert load_pt(path)[2].shape == (3,)
    import_pt([path], tmp_path / "out.h5")
    with GalaxyFile(tmp_path / "out.h5") as galaxies:
        np.testing.assert_array_equal(galaxies.read(0, 3).redshift, redshift.numpy())


def test_float64_tensors_are_converted_to_float32(tmp_path: Path) -> None:
    tensors = [t.double() for t in paper_tensors(3)]
    path = save_pt(tmp_path / "a.pt", *tensors)
    import_pt([path], tmp_path / "out.h5")
    with GalaxyFile(tmp_path / "out.h5") as galaxies:
        batch = galaxies.read(0, 3)
    assert batch.image.dtype == np.float32
    np.testing.assert_array_equal(batch.image, tensors[0].float().numpy())


def test_count_rows_sums_the_files(tmp_path: Path) -> None:
    paths = [
        save_pt(tmp_path / "a.pt", *paper_tensors(7)),
        save_pt(tmp_path / "b.pt", *paper_tensors(5)),
    ]
    assert count_rows(paths) == 12
    assert count_rows(paths[:1]) == 7
    assert count_rows([]) == 0


# --------------------------------------------------------------------------------------
# Bad values
# --------------------------------------------------------------------------------------


def test_infinite_redshift_is_refused_naming_file_and_row(tmp_path: Path) -> None:
    images, magnitudes, redshift = paper_tensors(6)
    redshift[4] = float("inf")
    path = save_pt(tmp_path / "a.pt", images, magnitudes, redshift)
    with pytest.raises(DataFormatError, match="row 4 has an infinite redshift") as info:
        import_pt([path], tmp_path / "out.h5")
    assert str(path) in str(info.value)
    assert folder_names(tmp_path) == ["a.pt"]


def test_nan_pixel_is_refused_naming_file_and_row(tmp_path: Path) -> None:
    good = save_pt(tmp_path / "a.pt", *paper_tensors(5))
    images, magnitudes, redshift = paper_tensors(6)
    images[3, 1, 16, 16] = float("nan")
    bad = save_pt(tmp_path / "b.pt", images, magnitudes, redshift)
    with pytest.raises(DataFormatError) as info:
        import_pt([good, bad], tmp_path / "out.h5", first_object_id=1)
    message = str(info.value)
    assert message.startswith(f"{bad}: row 3 ")
    assert "object_id 9" in message  # 5 rows of a.pt, then row 3 of b.pt
    assert "'image'" in message
    assert folder_names(tmp_path) == ["a.pt", "b.pt"]  # no output, no temp file


def test_infinite_magnitude_is_refused(tmp_path: Path) -> None:
    images, magnitudes, redshift = paper_tensors(4)
    magnitudes[1, 2] = float("-inf")
    path = save_pt(tmp_path / "a.pt", images, magnitudes, redshift)
    with pytest.raises(DataFormatError, match=r"row 1 .*'magnitudes'"):
        import_pt([path], tmp_path / "out.h5")
    assert folder_names(tmp_path) == ["a.pt"]


# --------------------------------------------------------------------------------------
# Bad shapes and payloads
# --------------------------------------------------------------------------------------

N = 6
WRONG_SHAPES = {
    "small images": (
        (torch.zeros(N, 5, 16, 16), torch.zeros(N, 5), torch.zeros(N)),
        "images has shape (6, 5, 16, 16); expected (6, 5, 32, 32)",
    ),
    "three bands": (
        (torch.zeros(N, 3, 32, 32), torch.zeros(N, 5), torch.zeros(N)),
        "images has shape (6, 3, 32, 32); expected (6, 5, 32, 32)",
    ),
    "four magnitudes": (
        (torch.zeros(N, 5, 32, 32), torch.zeros(N, 4), torch.zeros(N)),
        "magnitudes has shape (6, 4); expected (6, 5)",
    ),
    "short magnitudes": (
        (torch.zeros(N, 5, 32, 32), torch.zeros(N - 1, 5), torch.zeros(N - 1)),
        "magnitudes has shape (5, 5); expected (6, 5)",
    ),
    "long redshift": (
        (torch.zeros(N, 5, 32, 32), torch.zeros(N, 5), torch.zeros(N + 1)),
        "redshift has shape (7,); expected (6,)",
    ),
    "redshift matrix": (
        (torch.zeros(N, 5, 32, 32), torch.zeros(N, 5), torch.zeros(N, 2)),
        "redshift has shape (6, 2); expected (6,)",
    ),
}


@pytest.mark.parametrize("case", list(WRONG_SHAPES))
def test_wrong_shape_is_refused_naming_tensor_and_expected_shape(
    tmp_path: Path, case: str
) -> None:
    tensors, expected = WRONG_SHAPES[case]
    path = save_pt(tmp_path / "a.pt", *tensors)
    with pytest.raises(DataFormatError) as info:
        import_pt([path], tmp_path / "out.h5")
    assert str(info.value).startswith(f"{path}: {expected}")
    assert folder_names(tmp_path) == ["a.pt"]


def test_integer_tensors_are_refused(tmp_path: Path) -> None:
    images, magnitudes, redshift = paper_tensors(3)
    path = save_pt(tmp_path / "a.pt", images.to(torch.int32), magnitudes, redshift)
    with pytest.raises(DataFormatError, match=r"images has dtype torch\.int32"):
        load_pt(path)


def test_malicious_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(Hostile(marker), path)
    assert not marker.exists()
    with pytest.raises(DataFormatError, match="cannot be loaded safely") as info:
        import_pt([path], tmp_path / "out.h5")
    assert str(path) in str(info.value)
    assert not marker.exists()
    assert not (tmp_path / "out.h5").exists()


def test_malicious_tensor_dataset_is_refused_without_running_it(tmp_path: Path) -> None:
    """The hostile object hides inside an allowed TensorDataset."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    dataset = TensorDataset(*paper_tensors(2))
    dataset.tensors = (*dataset.tensors, Hostile(marker))
    torch.save(dataset, path)
    with pytest.raises(DataFormatError, match="cannot be loaded safely"):
        count_rows([path])
    assert not marker.exists()


def test_legacy_pickle_file_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump(Hostile(marker), fh)
    with pytest.raises(DataFormatError, match="cannot be loaded safely"):
        load_pt(path)
    assert not marker.exists()


NOT_TENSORS = {
    "dict": {"images": torch.zeros(2, 5, 32, 32)},
    "string": "galaxies",
    "two tensors": (torch.zeros(2, 5, 32, 32), torch.zeros(2, 5)),
    "three numbers": [1, 2, 3],
    "three strings": ("images", "magnitudes", "redshift"),
}


@pytest.mark.parametrize("case", list(NOT_TENSORS))
def test_non_tensor_payload_is_refused(tmp_path: Path, case: str) -> None:
    path = tmp_path / "a.pt"
    torch.save(NOT_TENSORS[case], path)
    with pytest.raises(DataFormatError, match="expected a TensorDataset") as info:
        import_pt([path], tmp_path / "out.h5")
    assert str(path) in str(info.value)
    assert folder_names(tmp_path) == ["a.pt"]


def test_missing_and_garbage_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="no such file"):
        count_rows([tmp_path / "absent.pt"])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(DataFormatError, match="cannot be loaded safely") as info:
        load_pt(garbage)
    assert str(garbage) in str(info.value)


def test_no_input_files_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="no input files"):
        import_pt([], tmp_path / "out.h5")
    assert list(tmp_path.iterdir()) == []
