"""The real Snakemake workflow on a tiny configuration, run as a user runs it."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from cai.formats import GalaxyFile
from cai.model import ModelConfig, create_model

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
TINY = {
    "data": {"synthetic": {"n_galaxies": 60, "seed": 7}},
    "partition": {"size_mb": 0.5},  # 25 galaxies a partition: 25, 25, 10
    # 60 galaxies are too few to fine-tune on (tests/test_finetune.py trains).
    "finetune": {"train": False},
}
RUN = Path("results/local/dataset/0.5MB-b512/r1")
JOB_IDS = ["00000", "00001", "00002"]

pytestmark = pytest.mark.workflow


def snakemake_command(workdir: Path, config: dict | None = None) -> list[str]:
    """Snakemake on the repository's Snakefile with the tiny config (plus ``config``
    overrides), which is written to ``workdir/tiny.yaml``."""
    config_path = workdir / "tiny.yaml"
    merged = json.loads(json.dumps(TINY))
    for key, value in (config or {}).items():
        merged.setdefault(key, {}).update(value)
    config_path.write_text(yaml.safe_dump(merged))
    snakefile = str(REPO / "Snakefile")
    return [str(SNAKEMAKE), "-s", snakefile, "--configfile", str(config_path)]


def snakemake(
    workdir: Path, *args: str, config: dict | None = None, timeout: int = 600
):
    """Run the tiny workflow in ``workdir`` on 2 cores; return the finished process."""
    return subprocess.run(
        [*snakemake_command(workdir, config), "--cores", "2", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One complete run of the tiny workflow, and its report."""
    workdir = tmp_path_factory.mktemp("workflow")
    check(snakemake(workdir))
    check(snakemake(workdir, "--report", "results/report.html"))
    return workdir


def test_dry_run_lists_every_job_and_runs_none(tmp_path):
    result = check(snakemake(tmp_path, "--dry-run"))
    assert re.search(r"^infer_local\s+3$", result.stdout, re.MULTILINE)
    for rule in ("simulate", "partition", "aggregate", "accuracy", "plot_redshift"):
        assert rule in result.stdout
    assert not (tmp_path / "results").exists()


def test_outputs_are_complete_and_consistent(finished_run):
    run = finished_run / RUN
    catalogue = pq.read_table(run / "catalogue.parquet").to_pandas()
    assert len(catalogue) == 60
    assert catalogue["object_id"].tolist() == list(range(1, 61))
    with GalaxyFile(finished_run / "results/data/synthetic.h5") as galaxies:
        batch = galaxies.read(0, 60)
    np.testing.assert_array_equal(catalogue["z_true"], batch.redshift)

    # The DAG's predictions are the model's, on the same inputs and weights.
    model, _ = create_model(ModelConfig(depth=12, num_heads=8), seed=0)
    with torch.inference_mode():
        direct = model(
            torch.from_numpy(batch.image), torch.from_numpy(batch.magnitudes)
        )
    np.testing.assert_allclose(
        catalogue["z_pred"], direct.numpy(), rtol=1e-5, atol=1e-6
    )

    table = pd.read_csv(run / "partition_metrics.tsv", sep="\t")
    assert table["partition"].tolist() == ["part-00000", "part-00001", "part-00002"]
    assert table["rows"].tolist() == [25, 25, 10]
    timing = [
        "fetch_s",
        "model_load_s",
        "read_s",
        "compute_s",
        "write_s",
        "samples_per_s",
    ]
    assert (table[timing] >= 0).all().all()
    expected_bits = table["rows"] * 164_000 / table["inference_s"]
    np.testing.assert_allclose(table["bits_per_s"], expected_bits, rtol=1e-5)

    accuracy = pd.read_csv(run / "accuracy.tsv", sep="\t")
    assert set(accuracy["metric"]) == {
        "n",
        "mae",
        "mse",
        "bias",
        "nmad",
        "outlier_fraction",
        "r2",
    }
    assert (accuracy["weights"] == "untrained weights (seed 0)").all()

    summary = json.loads((run / "summary.json").read_text())
    assert summary["rows"] == 60 and summary["partitions"] == 3
    assert summary["throughput_bits_per_s"] == pytest.approx(
        60 * 164_000 / summary["end_to_end_s"]
    )

    for name in ("redshift_density", "partition_times", "partition_throughput"):
        assert (run / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gate = pd.read_csv(
        finished_run / "results/precision/0.5MB-b512/precision_gate.tsv", sep="\t"
    )
    assert list(gate["precision"]) == ["fp32", "bf16", "int8"]
    assert (gate["galaxies"] == 60).all() and gate.loc[0, "max_abs_dz_pred"] == 0
    report = (finished_run / "results/report.html").read_text()
    assert "redshift_density.png" in report and "accuracy.tsv" in report
    assert "precision_gate.tsv" in report
    for log in ("simulate.log", "partition-0.5MB.log"):
        assert "done in" in (finished_run / "results/logs" / log).read_text()


def test_rerun_of_a_finished_run_does_nothing(finished_run):
    result = check(snakemake(finished_run, "--dry-run"))
    assert "Nothing to be done" in result.stdout + result.stderr


def job_files(workdir: Path) -> dict[str, float]:
    """mtime of every inference output of the tiny run, by file name."""
    jobs = workdir / RUN / "jobs"
    return (
        {p.name: p.stat().st_mtime_ns for p in jobs.iterdir()} if jobs.exists() else {}
    )


def test_failing_partition_leaves_others_intact_and_rerun_redoes_only_it(tmp_path):
    check(snakemake(tmp_path, "--until", "partition"))
    part = tmp_path / "results/partitions/0.5MB/part-00001.h5"
    good = part.read_bytes()
    part.write_bytes(good[:1000] + bytes(100) + good[1100:])  # corrupt, same size

    result = snakemake(tmp_path, "--keep-going")
    assert result.returncode != 0
    log = (
        tmp_path / "results/logs/local/dataset/0.5MB-b512/r1/infer-job-00001.log"
    ).read_text()
    assert "part-00001.h5" in log and "ChecksumError" in log
    done = job_files(tmp_path)
    assert sorted(done) == sorted(
        f"job-{j}.{ext}" for j in ("00000", "00002") for ext in ("json", "parquet")
    )
    assert not (tmp_path / RUN / "catalogue.parquet").exists()

    part.write_bytes(good)
    check(snakemake(tmp_path))
    after = job_files(tmp_path)
    assert all(after[name] == stamp for name, stamp in done.items())
    assert "job-00001.parquet" in after
    assert len(pq.read_table(tmp_path / RUN / "catalogue.parquet")) == 60


def test_killed_run_resumes_with_only_the_unfinished_partitions(tmp_path):
    command = [*snakemake_command(tmp_path), "--cores", "1"]
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    # Kill once one job has finished and Snakemake has started the next one, so the
    # finished job is recorded as complete and the next is cut off mid-way.
    logs = tmp_path / "results/logs/local/dataset/0.5MB-b512/r1"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (
        any(name.endswith(".json") for name in job_files(tmp_path))
        and len(list(logs.glob("infer-job-*.log"))) >= 2
    ):
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)  # the whole run dies at once, mid-job
    process.wait()
    finished = {n: t for n, t in job_files(tmp_path).items() if not n.startswith(".")}
    assert 0 < len(finished) < 2 * len(JOB_IDS), f"killed too early or late: {finished}"

    check(snakemake(tmp_path, "--unlock"))
    rerun = check(snakemake(tmp_path))
    after = job_files(tmp_path)
    redone = [name for name, stamp in finished.items() if after[name] != stamp]
    assert not redone, f"finished outputs redone: {redone}\n{rerun.stderr[-3000:]}"
    assert sorted(after) == sorted(
        f"job-{j}.{e}" for j in JOB_IDS for e in ("json", "parquet")
    )
    assert len(pq.read_table(tmp_path / RUN / "catalogue.parquet")) == 60


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"data": {"synthetic": {"n_galaxie": 5}}}, "n_galaxie"),
        ({"inference": {"batch_size": 0}}, "batch_size"),
        ({"model": {"num_heads": 5}}, "num_heads"),
        ({"partition": {"size_mb": 0.001}}, "size_mb"),
        # 60 galaxies leave 6 for validation: fine-tuning needs 100 of them.
        ({"finetune": {"train": "auto"}}, "at least 1,000 labelled galaxies"),
        ({"finetune": {"split": {"train": 0.8}}}, "sum to 1.1"),
    ],
)
def test_bad_config_is_refused_before_anything_runs(tmp_path, override, expected):
    result = snakemake(tmp_path, "--dry-run", config=override)
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


def test_copy_of_repo_config_is_the_default(tmp_path):
    """The default config runs from any folder (the Snakefile finds its config)."""
    shutil.copy(REPO / "config/config.yaml", tmp_path / "c.yaml")
    result = check(snakemake(tmp_path, "--dry-run"))
    assert "simulate" in result.stdout


# The default run's fine-tuning in miniature: 1,000 galaxies (700 train, 100
# validation, 200 test), a one-block encoder, two epochs.
FINETUNE = {
    "data": {"synthetic": {"n_galaxies": 1000, "seed": 7}},
    "partition": {"size_mb": 5},  # 255 galaxies a partition
    "model": {"depth": 1},
    "finetune": {"train": "auto", "max_epochs": 2},
    "precision_gate": {"max_galaxies": 64},
}
FINETUNE_RUN = Path("results/local/dataset/5MB-b512/r1")


@pytest.fixture(scope="module")
def finetuned_run(tmp_path_factory):
    """The tiny workflow with fine-tuning, and its report."""
    workdir = tmp_path_factory.mktemp("finetuned")
    check(snakemake(workdir, config=FINETUNE))
    check(snakemake(workdir, "--report", "results/report.html", config=FINETUNE))
    return workdir


def test_default_dag_fine_tunes_before_predicting(finetuned_run):
    dry = check(snakemake(finetuned_run, "--dry-run", "--forceall", config=FINETUNE))
    for rule in ("split", "finetune", "baseline_knn", "plot_training"):
        assert re.search(rf"^{rule}\s+1$", dry.stdout, re.MULTILINE), rule
    record = json.loads((finetuned_run / "results/finetune/training.json").read_text())
    assert record["data"]["synthetic"] and record["epochs_run"] == 2
    weights = record["weights"]
    assert weights.startswith("astromae-finetuned.safetensors: head fine-tuned on 700")
    assert "synthetic galaxies" in weights
    summary = json.loads((finetuned_run / FINETUNE_RUN / "summary.json").read_text())
    assert summary["weights"] == weights
    gate = pd.read_csv(
        finetuned_run / "results/precision/5MB-b512/precision_gate.tsv", sep="\t"
    )
    assert (gate["weights"] == weights).all()


def test_accuracy_is_of_the_test_split_beside_the_knn_baseline(finetuned_run):
    accuracy = pd.read_csv(finetuned_run / FINETUNE_RUN / "accuracy.tsv", sep="\t")
    values = accuracy.set_index("metric")
    assert values.loc["n", "value"] == 200 and values.loc["n", "knn_baseline"] == 200
    assert accuracy["evaluated_on"].iloc[0] == (
        "test split: 200 of 1,000 labelled galaxies, never trained on"
    )
    assert (
        accuracy["baseline"].iloc[0].startswith("k nearest neighbours on the colours")
    )
    assert "fine-tuned on 700 synthetic galaxies" in accuracy["weights"].iloc[0]
    # The catalogue still holds every galaxy: inference predicted all of them.
    catalogue = pq.read_table(finetuned_run / FINETUNE_RUN / "catalogue.parquet")
    assert catalogue.num_rows == 1000
    report = (finetuned_run / "results/report.html").read_text()
    assert "training.png" in report
    png = (finetuned_run / "results/finetune/training.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_given_checkpoint_is_used_as_it_is(finetuned_run, tmp_path):
    shutil.copy(
        finetuned_run / "results/finetune/astromae-finetuned.safetensors",
        tmp_path / "mine.safetensors",
    )
    config = {**FINETUNE, "model": {"depth": 1, "checkpoint": "mine.safetensors"}}
    dry = check(snakemake(tmp_path, "--dry-run", config=config))
    assert "finetune" not in dry.stdout and "split" not in dry.stdout
    assert re.search(r"^infer_local\s+4$", dry.stdout, re.MULTILINE)
