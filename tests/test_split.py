"""The train/validation/test split, the kNN baseline and accuracy on the test split."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import small_batch

from cai import baseline
from cai.baseline import knn_baseline, nearest_mean, read_baseline
from cai.errors import ConfigError, DataFormatError
from cai.formats import GalaxyWriter
from cai.metrics import redshift_metrics, write_accuracy_table
from cai.split import (
    PAPER_FRACTIONS,
    SPLITS,
    assign_splits,
    check_split_sizes,
    read_split,
    split_counts,
    write_split,
)


def test_split_is_deterministic_exact_and_independent_of_row_order():
    ids = np.arange(1, 1001, dtype=np.int64)
    codes = assign_splits(ids, 0, PAPER_FRACTIONS)
    np.testing.assert_array_equal(codes, assign_splits(ids, 0, PAPER_FRACTIONS))
    assert np.bincount(codes).tolist() == [700, 100, 200]
    # Each galaxy keeps its split whatever order the rows come in.
    order = np.random.default_rng(1).permutation(len(ids))
    np.testing.assert_array_equal(
        assign_splits(ids[order], 0, PAPER_FRACTIONS), codes[order]
    )
    # Another seed deals the galaxies anew, in the same proportions.
    other = assign_splits(ids, 1, PAPER_FRACTIONS)
    assert np.bincount(other).tolist() == [700, 100, 200]
    assert (other != codes).mean() > 0.3


def test_split_counts_round_train_and_validation_and_give_test_the_rest():
    assert split_counts(4000, PAPER_FRACTIONS) == {
        "train": 2800,
        "validation": 400,
        "test": 800,
    }
    counts = split_counts(1003, PAPER_FRACTIONS)
    assert sum(counts.values()) == 1003 and counts["validation"] == 100


def test_repeated_object_ids_are_refused():
    with pytest.raises(DataFormatError, match=r"occur more than once \(e\.g\. 3\)"):
        assign_splits(np.array([1, 2, 3, 3, 4]), 0, PAPER_FRACTIONS)


@pytest.mark.parametrize(
    ("fractions", "message"),
    [
        ({"train": 0.8, "validation": 0.1, "test": 0.2}, "sum to 1.1"),
        ({"train": 0.7, "validation": 0.3}, "expected"),
        ({"train": 1.0, "validation": 0.0, "test": 0.0}, r"in \(0, 1\)"),
    ],
)
def test_bad_fractions_are_refused(fractions, message):
    with pytest.raises(ConfigError, match=message):
        split_counts(100, fractions)


def test_small_validation_split_is_refused_with_the_number_needed():
    counts = split_counts(300, PAPER_FRACTIONS)
    with pytest.raises(ConfigError) as err:
        check_split_sizes(counts, PAPER_FRACTIONS, 100)
    message = str(err.value)
    assert "30 of 300" in message and "at least 1,000 labelled galaxies" in message
    check_split_sizes(split_counts(1000, PAPER_FRACTIONS), PAPER_FRACTIONS, 100)


def write_galaxies(path, n, seed=5, first_object_id=1, unlabelled=0):
    batch = small_batch(n, seed, first_object_id)
    batch.redshift[:unlabelled] = np.nan
    with GalaxyWriter(path, n, {"generator": "cai.sky.simulate"}) as writer:
        writer.append(batch)
    return path


def test_unlabelled_galaxies_are_refused_with_their_count(tmp_path):
    good = write_galaxies(tmp_path / "good.h5", 40)
    bad = write_galaxies(tmp_path / "bad.h5", 50, first_object_id=100, unlabelled=7)
    with pytest.raises(DataFormatError) as err:
        write_split([good, bad], tmp_path / "split.parquet", 0, min_validation=1)
    assert "7 galaxies have no redshift" in str(err.value)
    assert f"{bad}: 7 of 50" in str(err.value)
    assert not (tmp_path / "split.parquet").exists()


def test_an_infinite_redshift_is_refused_as_bad_data(tmp_path):
    path = write_galaxies(tmp_path / "g.h5", 40)
    with GalaxyWriter(path, 40, {"generator": "test"}) as writer:
        batch = small_batch(40, 5, 1)
        batch.redshift[12] = np.inf
        writer.append(batch)
    with pytest.raises(DataFormatError) as err:
        write_split([path], tmp_path / "split.parquet", 0, min_validation=1)
    assert f"{path}: 1 galaxies have an infinite redshift" in str(err.value)
    assert "row 12, object_id 13" in str(err.value)


def test_repeated_object_ids_across_files_are_named_with_their_files(tmp_path):
    a = write_galaxies(tmp_path / "a.h5", 40)
    b = write_galaxies(tmp_path / "b.h5", 40, first_object_id=30)
    c = write_galaxies(tmp_path / "c.h5", 40, first_object_id=500)
    with pytest.raises(DataFormatError) as err:
        write_split([a, b, c], tmp_path / "split.parquet", 0, min_validation=1)
    message = str(err.value)
    assert "11 object_ids occur more than once (e.g. 30, 31" in message
    assert f"in {a}, {b});" in message and str(c) not in message
    assert not (tmp_path / "split.parquet").exists()


def test_split_table_round_trips(tmp_path):
    files = [
        write_galaxies(tmp_path / "a.h5", 600),
        write_galaxies(tmp_path / "b.h5", 400, seed=6, first_object_id=1000),
    ]
    meta = write_split(files, tmp_path / "split.parquet", 3, min_validation=100)
    assert meta["counts"] == {"train": 700, "validation": 100, "test": 200}
    assert meta["synthetic"] is True
    split = read_split(tmp_path / "split.parquet")
    assert split.meta == meta
    ids = {name: set(split.ids(name).tolist()) for name in SPLITS}
    assert not ids["train"] & ids["validation"] and not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]
    assert len(ids["train"] | ids["validation"] | ids["test"]) == 1000
    with pytest.raises(DataFormatError, match="not in the split"):
        split.codes_of(np.array([1, 99999]), "other.h5")


def test_nearest_mean_averages_the_k_nearest_in_blocks(monkeypatch):
    train_x = np.array([[0.0], [1.0], [10.0], [11.0]])
    train_z = np.array([0.0, 1.0, 10.0, 11.0])
    query = np.array([[0.2], [10.4], [5.2]])
    monkeypatch.setattr(baseline, "DISTANCE_BUDGET", 4)  # one query a block
    got = nearest_mean(train_x, train_z, query, [1, 2])
    np.testing.assert_allclose(got[1], [0.0, 10.0, 1.0])
    np.testing.assert_allclose(got[2], [0.5, 10.5, 5.5])


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("labelled")
    data = write_galaxies(folder / "galaxies.h5", 1500)
    write_split([data], folder / "split.parquet", 0)
    return folder, data


def test_knn_baseline_predicts_the_test_split_better_than_the_mean(labelled):
    folder, data = labelled
    meta = knn_baseline([data], folder / "split.parquet", folder / "knn.parquet")
    predicted, read_meta = read_baseline(folder / "knn.parquet")
    assert read_meta == meta and meta["k"] in baseline.K_CHOICES
    split = read_split(folder / "split.parquet")
    assert sorted(predicted["object_id"]) == sorted(split.ids("test"))
    z_true = predicted["z_true"].to_numpy()
    knn = redshift_metrics(predicted["z_pred"].to_numpy(), z_true)
    mean = redshift_metrics(np.full_like(z_true, z_true.mean()), z_true)
    assert knn["nmad"] < 0.6 * mean["nmad"] and knn["r2"] > 0.3


def catalogue(path, ids, z_pred, z_true):
    pq.write_table(
        pa.table(
            {
                "object_id": pa.array(ids, pa.int64()),
                "z_pred": pa.array(z_pred, pa.float32()),
                "z_true": pa.array(z_true, pa.float32()),
                "partition": pa.array(["part-00000"] * len(ids)),
            }
        ),
        path,
    )
    return path


def test_accuracy_counts_the_test_split_beside_the_baseline(labelled):
    folder, _ = labelled
    knn_baseline(
        [folder / "galaxies.h5"], folder / "split.parquet", folder / "knn.parquet"
    )
    split = read_split(folder / "split.parquet")
    z = np.random.default_rng(2).uniform(0.01, 0.3, len(split.object_id))
    z_pred = z + 0.01 * (1 + z) * (split.code == SPLITS.index("test"))
    path = catalogue(folder / "cat.parquet", split.object_id, z_pred, z)
    predicted, meta = read_baseline(folder / "knn.parquet")
    table = write_accuracy_table(
        path, folder / "acc.tsv", "w", folder / "split.parquet", folder / "knn.parquet"
    )
    values = dict(zip(table["metric"], table["value"], strict=True))
    assert values["n"] == 300 and values["bias"] == pytest.approx(0.01, abs=1e-6)
    assert "knn_baseline" in table and table["evaluated_on"].iloc[0].startswith(
        "test split: 300 of 1,500"
    )
    written = pd.read_csv(folder / "acc.tsv", sep="\t")
    assert list(written.columns[:3]) == ["metric", "value", "knn_baseline"]
    assert (written["baseline"] == meta["description"]).all()
    assert len(predicted) == 300


def test_accuracy_refuses_a_catalogue_without_the_test_galaxies(labelled):
    folder, _ = labelled
    split = read_split(folder / "split.parquet")
    keep = split.code != SPLITS.index("test")
    keep[np.flatnonzero(~keep)[1:]] = True  # all but one test galaxy
    ids = split.object_id[keep]
    path = catalogue(
        folder / "partial.parquet", ids, np.zeros(len(ids)), np.ones(len(ids))
    )
    with pytest.raises(DataFormatError, match="lacks 1 of the 300 test galaxies"):
        write_accuracy_table(path, folder / "x.tsv", "w", folder / "split.parquet")
    assert not (folder / "x.tsv").exists()


def test_accuracy_of_fine_tuned_weights_without_a_split_says_what_it_counts(
    labelled, caplog
):
    folder, _ = labelled
    split = read_split(folder / "split.parquet")
    z = np.full(len(split.object_id), 0.1)
    path = catalogue(folder / "all.parquet", split.object_id, z, z)
    table = write_accuracy_table(
        path, folder / "all.tsv", "m.safetensors: head fine-tuned on 1,050 galaxies"
    )
    assert table["evaluated_on"].iloc[0] == (
        "every galaxy of the catalogue (1,500), which may include galaxies the "
        "weights were fine-tuned on"
    )
    assert "cai metrics --split" in caplog.text
    untrained = write_accuracy_table(path, folder / "u.tsv", "untrained weights")
    assert untrained["evaluated_on"].iloc[0] == "every galaxy of the catalogue (1,500)"


def test_knn_baseline_tries_only_the_k_it_has_galaxies_for(tmp_path):
    data = write_galaxies(tmp_path / "g.h5", 30)
    write_split([data], tmp_path / "split.parquet", 0, min_validation=1)
    meta = knn_baseline([data], tmp_path / "split.parquet", tmp_path / "knn.parquet")
    assert meta["train"] == 21 and sorted(meta["validation_nmad"]) == ["16", "4", "8"]
    few = write_galaxies(tmp_path / "few.h5", 6)
    fractions = {"train": 0.4, "validation": 0.2, "test": 0.4}  # 2, 1, 3
    write_split([few], tmp_path / "few.parquet", 0, fractions, min_validation=1)
    with pytest.raises(DataFormatError, match="the kNN baseline needs at least 4"):
        knn_baseline([few], tmp_path / "few.parquet", tmp_path / "few-knn.parquet")
    assert not (tmp_path / "few-knn.parquet").exists()
