"""The experiment: its runs from the sweeps, the runs table and its cost arithmetic,
and the CI experiment end to end on the local machine, the local SLURM cluster and the
local AWS stack, through one `snakemake --profile profiles/slurm ... experiment`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_aws import stack_env, start_stack
from test_slurm import slurm  # noqa: F401  (the SLURM cluster fixture, module-scoped)

from cai.cost import Prices
from cai.errors import ConfigError, DataFormatError
from cai.experiment import (
    RunKey,
    data_label,
    experiment_runs,
    parse_data_label,
    read_runs,
    run_row,
    runs_table,
)
from cai.partition import rows_per_partition
from cai.runs_schema import RUN_COLUMNS

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
DEFAULTS = yaml.safe_load((REPO / "config/config.yaml").read_text())
PRICES = Prices.from_config(DEFAULTS["prices"])


def merged(base: dict, overlay: dict) -> dict:
    """``overlay`` deep-merged over ``base``, as Snakemake merges config files."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def experiment_config(name: str) -> dict:
    overlay = yaml.safe_load((REPO / f"config/experiments/{name}.yaml").read_text())
    return merged(DEFAULTS, overlay)


def test_runs_of_overlapping_sweeps_are_counted_once():
    config = experiment_config("ci")
    runs = experiment_runs(config)
    # scaling 3 backends x 3 sizes; partitions adds lambda at 0.5 MB (3); batch adds
    # batch 16 on local and lambda (2); two repeats each.
    assert len(runs) == (9 + 3 + 2) * 2
    assert len(set(runs)) == len(runs)
    # All of the first repeat, then all of the second.
    assert [r.repeat for r in runs] == [1] * 14 + [2] * 14
    assert runs[:14] == sorted(runs[:14])
    assert RunKey("lambda", 0.008, 0.5, 64, 2) in runs
    assert RunKey("local", 0.004, 1.0, 16, 1) in runs
    assert RunKey("local", 0.008, 1.0, 16, 1) not in runs


def test_data_size_that_does_not_survive_its_label_is_refused():
    config = experiment_config("ci")
    config["experiment"]["sweeps"][0]["data_gb"] = [0.0012345678]
    with pytest.raises(ConfigError, match=r"0\.0012345678 GB .* '0\.00123457GB'"):
        experiment_runs(config)


def test_unknown_backend_in_a_sweep_names_it():
    config = experiment_config("ci")
    config["experiment"]["sweeps"][1]["backends"] = ["lambda", "fargate"]
    with pytest.raises(ConfigError, match=r"sweeps\[1\] \(partitions\).*fargate"):
        experiment_runs(config)


def test_paper_experiment_covers_the_papers_matrix():
    config = experiment_config("paper")
    runs = experiment_runs(config)
    assert {r.backend for r in runs} == {"local", "slurm-cpu", "slurm-gpu", "lambda"}
    assert {r.data_gb for r in runs} == {
        1,
        2,
        4,
        6,
        8,
        10,
        12.6,
        100,
        256,
        512,
        768,
        1024,
    }
    assert {r.partition_mb for r in runs} == {25, 50, 75, 100}
    assert {r.batch_size for r in runs} == {32, 64, 128, 256, 512}
    assert {r.repeat for r in runs} == {1, 2, 3}
    assert max(r.data_gb for r in runs if r.backend == "local") == 8


def test_run_folders_and_data_labels():
    key = RunKey("slurm-gpu", 12.6, 25.0, 512, 3)
    assert key.path() == "results/slurm-gpu/12.6GB/25MB-b512/r3"
    assert RunKey("local", None, 0.5, 64, 1).path() == (
        "results/local/dataset/0.5MB-b64/r1"
    )
    assert parse_data_label(data_label(1024)) == 1024
    assert parse_data_label("dataset") is None
    with pytest.raises(ValueError, match="'1TB'"):
        parse_data_label("1TB")


def summary(**changes) -> dict:
    """A run summary as rule aggregate writes it: 4 jobs over 10 partitions."""
    base = {
        "device": "cpu",
        "precision": "fp32",
        "batch_size": 64,
        "rows": 500,
        "partitions": 10,
        "physical_partitions": 4,
        "storage_shared": True,
        "jobs": 4,
        "threads": 2,
        "end_to_end_s": 50.0,
        "partition_seconds": {"mean": 4.0, "p50": 3.9, "p95": 5.5, "max": 6.0},
        "sum_of_partition_bits_per_s": 1e9,
        "input_bits": 500 * 164_000,
        "peak_rss_mb": 900.0,
        "job_seconds": 7200.0,
    }
    return {**base, **changes}


SETTINGS = {
    "local": {"kind": "local", "threads": 2, "gpus": 0},
    "slurm-cpu": {"kind": "slurm", "threads": 2, "gpus": 0},
    "slurm-gpu": {"kind": "slurm", "threads": 4, "gpus": 1},
    "lambda": {"kind": "lambda", "threads": 2, "gpus": 0},
}


def test_slurm_cost_is_core_and_gpu_hours_held():
    key = RunKey("slurm-gpu", 1.0, 25.0, 64, 1)
    row = run_row(
        key, summary(threads=4), SETTINGS["slurm-gpu"], PRICES, experiment="t"
    )
    # 7,200 job-seconds = 2 h: 4 cores x 2 h = 8 core-hours, 1 GPU x 2 h.
    assert row["core_hours"] == pytest.approx(8.0)
    assert row["gpu_hours"] == pytest.approx(2.0)
    assert row["cost_usd"] == pytest.approx(8 * 0.05 + 2 * 2.50)
    assert "8 core-hours" in row["cost_basis"] and "GPU-hours" in row["cost_basis"]
    cpu = run_row(
        RunKey("slurm-cpu", 1.0, 25.0, 64, 1),
        summary(),
        SETTINGS["slurm-cpu"],
        PRICES,
        experiment="t",
    )
    assert cpu["cost_usd"] == pytest.approx(4 * 0.05) and cpu["gpu_hours"] == 0


def test_local_run_costs_nothing_and_throughputs_are_both_given():
    row = run_row(
        RunKey("local", 1.0, 25.0, 64, 2),
        summary(),
        SETTINGS["local"],
        PRICES,
        experiment="t",
    )
    assert list(row) == list(RUN_COLUMNS)
    assert row["cost_usd"] == 0 and row["core_hours"] == pytest.approx(4.0)
    assert row["throughput_wall_bits_per_s"] == pytest.approx(500 * 164_000 / 50)
    assert row["throughput_wall_samples_per_s"] == pytest.approx(10.0)
    assert row["throughput_sum_bits_per_s"] == 1e9
    assert row["run"] == "local/1GB/25MB-b64/r2"
    assert math.isnan(row["memory_mb"])


def test_lambda_run_takes_time_and_cost_from_its_dispatch():
    dispatch = {
        "dispatch_s": 12.5,
        "invocations": 10,
        "skipped": 0,
        "cost_usd": {"lambda": {"gb_s": 640.0}, "total": 0.0123},
    }
    key = RunKey("lambda", 1.0, 25.0, 64, 1)
    row = run_row(
        key,
        summary(),
        SETTINGS["lambda"],
        PRICES,
        experiment="t",
        dispatch=dispatch,
        memory_mb=10240,
    )
    assert row["end_to_end_s"] == 12.5 and row["invocations"] == 10
    assert row["cost_usd"] == 0.0123 and row["lambda_gb_s"] == 640.0
    assert row["memory_mb"] == 10240
    assert row["throughput_wall_samples_per_s"] == pytest.approx(500 / 12.5)
    with pytest.raises(DataFormatError, match=r"dispatch\.json"):
        run_row(key, summary(), SETTINGS["lambda"], PRICES, experiment="t")


def test_runs_table_written_as_csv_and_parquet(tmp_path):
    keys = [RunKey("local", 1.0, 25.0, 64, r) for r in (1, 2)]
    paths = []
    for key in keys:
        path = tmp_path / f"summary-{key.repeat}.json"
        path.write_text(json.dumps(summary(end_to_end_s=40.0 + key.repeat)))
        paths.append(path)
    table = runs_table(
        keys,
        paths,
        {},
        SETTINGS,
        DEFAULTS["prices"],
        experiment="t",
        lambda_memory_mb=None,
        csv_out=tmp_path / "runs.csv",
        parquet_out=tmp_path / "runs.parquet",
    )
    assert list(table["end_to_end_s"]) == [41.0, 42.0]
    for name in ("runs.csv", "runs.parquet"):
        again = read_runs(tmp_path / name)
        assert list(again.columns) == list(RUN_COLUMNS)
        assert list(again["repeat"]) == [1, 2]
    pd.read_csv(tmp_path / "runs.csv").drop(columns="cost_usd").to_csv(
        tmp_path / "bad.csv", index=False
    )
    with pytest.raises(DataFormatError, match=r"cost_usd.*rule experiment_table"):
        read_runs(tmp_path / "bad.csv")
    (tmp_path / "summary-1.json").write_text("{")
    with pytest.raises(DataFormatError, match=r"summary-1\.json"):
        runs_table(
            keys,
            paths,
            {},
            SETTINGS,
            DEFAULTS["prices"],
            experiment="t",
            lambda_memory_mb=None,
            csv_out=tmp_path / "x.csv",
            parquet_out=tmp_path / "x.parquet",
        )
    assert not (tmp_path / "x.csv").exists()


# ------------------------------------------------------------------ end to end (CI)

CI_RUNS = 28
PLANNER_MAX_ERROR = 0.25


@pytest.fixture(scope="module")
def ci_experiment(slurm, tmp_path_factory):  # noqa: F811
    """The CI experiment through the SLURM profile with the local AWS stack up: local
    runs on this machine, slurm-cpu runs as SLURM jobs, lambda runs on the stack."""
    workdir = tmp_path_factory.mktemp("experiment")
    stack = start_stack(
        tmp_path_factory.mktemp("aws-stack"), slots=2, timeout_s=300, memory_mb=3008
    )
    command = [
        str(SNAKEMAKE),
        "-s",
        str(REPO / "Snakefile"),
        "--profile",
        str(REPO / "profiles/slurm"),
        "--configfile",
        str(REPO / "config/experiments/ci.yaml"),
    ]
    with stack, stack_env(stack):
        run = subprocess.run(
            [*command, "--", "experiment"],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
        report = subprocess.run(
            [*command, "--report", "results/report.html", "--", "experiment"],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert report.returncode == 0, report.stderr[-4000:]
    return workdir


@pytest.mark.workflow
@pytest.mark.slurm
@pytest.mark.aws
def test_ci_experiment_has_every_run_figure_and_report(ci_experiment):
    out = ci_experiment / "results/experiments/ci"
    runs = read_runs(out / "runs.parquet")
    expected = experiment_runs(experiment_config("ci"))
    got = sorted(
        RunKey(r.backend, r.data_gb, r.partition_mb, int(r.batch_size), int(r.repeat))
        for r in runs.itertuples()
    )
    assert len(runs) == CI_RUNS and got == sorted(expected)
    assert read_runs(out / "runs.csv").shape == runs.shape
    assert dict(zip(runs["backend"], runs["kind"], strict=True)) == {
        "local": "local",
        "slurm-cpu": "slurm",
        "lambda": "lambda",
    }
    # Every galaxy of every (cyclically reused) partition was predicted.
    rows = runs["partition_mb"].map(rows_per_partition)
    assert (runs["galaxies"] == runs["partitions"] * rows).all()
    assert runs.loc[runs["data_gb"] > 0.0038, "storage_shared"].all()
    assert not runs.loc[runs["data_gb"] < 0.0038, "storage_shared"].any()
    for column in ("end_to_end_s", "partition_s_mean", "throughput_wall_bits_per_s"):
        assert (runs[column] > 0).all(), column
    cost = runs.groupby("kind")["cost_usd"]
    assert (cost.min()[["slurm", "lambda"]] > 0).all() and cost.max()["local"] == 0

    series = json.loads((out / "figures/figures.json").read_text())
    assert series["time_vs_data_size"] == ["lambda", "local", "slurm-cpu"]
    assert series["lambda_time_vs_data_size"] == ["0.5 MB", "1 MB"]
    # slurm-cpu ran one batch size: a single point.
    assert series["throughput_vs_batch_size"] == ["lambda", "local", "slurm-cpu"]
    assert series["extension"] == []
    for name in series:
        for ext in ("png", "pdf"):
            assert (out / f"figures/{name}.{ext}").stat().st_size > 1000

    report = (ci_experiment / "results/report.html").read_text()
    for name in ("runs.csv", "plan.tsv", "plan_recommended.tsv", "planner_check.tsv"):
        assert name in report, name
    for name in series:
        assert name in report, name


@pytest.mark.workflow
@pytest.mark.slurm
@pytest.mark.aws
def test_planner_predicts_held_out_data_sizes_within_25_percent(ci_experiment):
    check = pd.read_csv(
        ci_experiment / "results/experiments/ci/planner_check.tsv", sep="\t"
    )
    times = check[check["measure"] == "end_to_end_s"]
    # Every run at the held-out size: 3 backends, Lambda at two partition sizes, 2
    # repeats.
    assert len(times) == 8 and set(times["data_gb"]) == {0.008}
    assert set(times["backend"]) == {"local", "slurm-cpu", "lambda"}
    worst = times["rel_error"].abs().max()
    assert worst <= PLANNER_MAX_ERROR, times.to_string()
    plan = pd.read_csv(ci_experiment / "results/experiments/ci/plan.tsv", sep="\t")
    assert set(plan["backend"]) == {"local", "slurm-cpu", "lambda"}
    assert (plan["time_s"] > 0).all()
    best = pd.read_csv(
        ci_experiment / "results/experiments/ci/plan_recommended.tsv", sep="\t"
    )
    assert list(best["data_gb"]) == [0.008, 0.1]
    assert best["reason"].str.startswith("cheapest").all()
