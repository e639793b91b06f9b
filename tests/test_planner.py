"""The planner against runs made by a known time model: fits, waves, costs, choices."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import pytest
import yaml
from test_cost import PRICE_CONFIG

from cai.cli import main
from cai.cost import Prices, hpc_cost, lambda_cost, s3_cost
from cai.errors import ConfigError, DataFormatError
from cai.partition import rows_per_partition
from cai.plan import logical_partitions
from cai.planner import (
    Assumptions,
    calibrate,
    plan_table,
    predict,
    recommend,
    validate,
)

EXACT = 1e-6
ASSUME = Assumptions()
# backend -> (kind, device, threads, memory_mb, fixed_s, per_galaxy_s, overhead_s,
# start_s: what each wave adds beyond its partitions; the Lambda runs all fit in one
# wave, so theirs cannot be told from the overhead)
MODELS = {
    "local": ("local", "cpu", 8, math.nan, 2.0, 0.005, 4.0, 3.0),
    "slurm-cpu": ("slurm", "cpu", 1, math.nan, 3.0, 0.004, 20.0, 1.5),
    "slurm-gpu": ("slurm", "cuda", 4, math.nan, 5.0, 0.0002, 25.0, 4.0),
    "lambda": ("lambda", "cpu", 6, 10240.0, 1.5, 0.004, 12.0, 0.0),
}


def model_run(
    backend: str,
    partition_mb: float,
    data_gb: float,
    batch_size: int = 512,
    slowdown: float = 1.0,
    **change: Any,
) -> dict[str, Any]:
    """One run as the known model makes it (``slowdown`` stretches end_to_end_s)."""
    kind, device, threads, memory, fixed, per_galaxy, overhead, start = MODELS[backend]
    threads = change.get("threads", threads)
    per_galaxy = change.get("per_galaxy", per_galaxy)
    rows = rows_per_partition(partition_mb)
    partitions = logical_partitions(data_gb, partition_mb)
    partition_s = fixed + per_galaxy * rows
    waves = math.ceil(partitions / ASSUME.slots(kind, device))
    end_to_end = overhead + ASSUME.startup_s(kind) + waves * (partition_s + start)
    return {
        "run": f"{backend}/{data_gb:g}GB-{partition_mb:g}MB-b{batch_size}/r1",
        "backend": backend,
        "kind": kind,
        "device": device,
        "precision": "fp32",
        "data_gb": data_gb,
        "galaxies": partitions * rows,
        "partition_mb": partition_mb,
        "batch_size": batch_size,
        "partitions": partitions,
        "invocations": partitions,
        "threads": threads,
        "memory_mb": memory,
        "end_to_end_s": end_to_end * slowdown,
        "partition_s_mean": partition_s,
        "peak_rss_mb": 900.0 + 0.4 * rows,
    }


def model_runs(
    backends: tuple[str, ...] = tuple(MODELS),
    sizes: tuple[float, ...] = (25, 50, 100),
    data_gbs: tuple[float, ...] = (1, 4),
) -> pd.DataFrame:
    return pd.DataFrame(
        [model_run(b, s, d) for b in backends for s in sizes for d in data_gbs]
    )


@pytest.fixture(scope="module")
def prices() -> Prices:
    return Prices.from_config(PRICE_CONFIG)


@pytest.fixture(scope="module")
def cal():
    return calibrate(model_runs())


@pytest.mark.parametrize("backend", list(MODELS))
def test_calibration_recovers_the_model(cal, backend: str) -> None:
    _, _, threads, memory, fixed, per_galaxy, overhead, start = MODELS[backend]
    fit = cal.fit(backend, 512)
    assert fit["invocation_start_s"] == pytest.approx(start, abs=EXACT)
    assert fit["model"] == "linear"
    assert fit["fixed_s"] == pytest.approx(fixed, abs=EXACT)
    share = ASSUME.cpu_share(fit["kind"], memory, threads)
    assert fit["galaxy_cpu_s"] == pytest.approx(per_galaxy * share, abs=EXACT)
    assert fit["overhead_s"] == pytest.approx(overhead, abs=EXACT)
    rows = cal.table[cal.table["backend"] == backend]
    assert list(rows["partition_mb"]) == [25, 50, 100]
    assert rows["per_galaxy_s"].to_numpy() == pytest.approx(per_galaxy, abs=EXACT)
    assert rows["overhead_s"].to_numpy() == pytest.approx(overhead, abs=EXACT)


def test_one_partition_size_is_proportional() -> None:
    runs = pd.DataFrame([model_run("local", 50, d, per_galaxy=0.01) for d in (1, 2)])
    runs["partition_s_mean"] = 0.01 * rows_per_partition(50)  # no fixed part
    runs["end_to_end_s"] = 4.0 + runs["partitions"] * runs["partition_s_mean"]
    fit = calibrate(runs).fit("local", 512)
    assert fit["model"] == "proportional"
    assert fit["fixed_s"] == 0
    assert fit["galaxy_cpu_s"] == pytest.approx(0.01, abs=EXACT)
    assert fit["overhead_s"] == pytest.approx(4.0, abs=EXACT)


def test_waves_follow_the_lambda_concurrency(cal, prices: Prices) -> None:
    data_gb = 2000 * 25 / 1024  # 2,000 partitions of 25 MB
    one = predict(cal, ASSUME, prices, data_gb, "lambda", 25)
    assert (one["partitions"], one["invocations"], one["waves"]) == (2000, 2000, 2)
    _, _, _, _, fixed, per_galaxy, overhead, _ = MODELS["lambda"]
    partition_s = fixed + per_galaxy * rows_per_partition(25)
    assert one["partition_s"] == pytest.approx(partition_s, abs=EXACT)
    assert one["compute_s"] == pytest.approx(2 * partition_s, abs=EXACT)
    assert one["time_s"] == pytest.approx(
        overhead + ASSUME.lambda_cold_start_s + 2 * partition_s, abs=EXACT
    )
    assert not one["extrapolated"]
    half = Assumptions.from_config({"lambda_concurrency": 500})
    assert predict(cal, half, prices, data_gb, "lambda", 25)["waves"] == 4
    small = predict(cal, ASSUME, prices, 1, "lambda", 25)
    assert (small["partitions"], small["waves"]) == (41, 1)


def test_lambda_memory_scales_compute_by_vcpus(cal, prices: Prices) -> None:
    _, _, _, _, fixed, per_galaxy, _, _ = MODELS["lambda"]
    variable = per_galaxy * rows_per_partition(50)
    measured = predict(cal, ASSUME, prices, 1, "lambda", 50)
    assert measured["memory_mb"] == 10240
    assert measured["partition_s"] == pytest.approx(fixed + variable, abs=EXACT)
    two_vcpus = predict(cal, ASSUME, prices, 1, "lambda", 50, memory_mb=2 * 1769)
    share = 10240 / 1769  # 5.79 vCPUs' worth at 10,240 MB
    assert two_vcpus["cpu_share"] == pytest.approx(2.0)
    assert two_vcpus["partition_s"] == pytest.approx(
        fixed + variable * share / 2, abs=EXACT
    )
    assert "CPU scaled from 10240 MB" in two_vcpus["note"]

    # Measured with 2 threads: memory past 2 vCPUs buys nothing.
    runs = pd.DataFrame([model_run("lambda", s, 1, threads=2) for s in (25, 50, 100)])
    two_threads = calibrate(runs)
    same = predict(two_threads, ASSUME, prices, 1, "lambda", 50, memory_mb=8192)
    assert same["cpu_share"] == 2
    assert same["partition_s"] == pytest.approx(fixed + variable, abs=EXACT)


def test_lambda_cost_is_cost_lambda_cost(cal, prices: Prices) -> None:
    option = predict(cal, ASSUME, prices, 10, "lambda", 100, memory_mb=4096)
    invocations = option["invocations"]
    billed_s = (
        invocations * option["partition_s"]
        + min(invocations, 1000) * ASSUME.lambda_cold_start_s
    )
    lam = lambda_cost(
        [{"billed_ms": billed_s * 1000, "memory_mb": 4096, "requests": invocations}],
        prices,
        "x86_64",
        2048,
    )
    s3 = s3_cost(
        puts=2 * invocations + 1,
        gets=2 * option["partitions"] + 2 * invocations + 4 * invocations,
        prices=prices,
    )
    assert option["cost_usd"] == pytest.approx(
        lam["total_usd"] + s3["total_usd"], rel=1e-12
    )
    assert "GB-s at 4096 MB x86_64" in option["cost_basis"]


def test_hpc_and_local_costs(cal, prices: Prices) -> None:
    cpu = predict(cal, ASSUME, prices, 10, "slurm-cpu", 50)
    # Each job holds its core for its start (1.5 s) and its partition.
    job_s = cpu["partition_s"] + cpu["invocation_start_s"]
    assert cpu["invocation_start_s"] == pytest.approx(1.5, abs=EXACT)
    core_hours = 1 * cpu["partitions"] * job_s / 3600
    assert cpu["cost_usd"] == pytest.approx(
        hpc_cost(core_hours, 0, prices)["total_usd"], rel=1e-12
    )
    assert cpu["waves"] == math.ceil(cpu["partitions"] / 64)
    assert cpu["startup_s"] == 30
    gpu = predict(cal, ASSUME, prices, 10, "slurm-gpu", 50)
    gpu_hours = gpu["partitions"] * (gpu["partition_s"] + 4.0) / 3600
    # The GPU and the job's 4 cores.
    assert gpu["cost_usd"] == pytest.approx(gpu_hours * (2.5 + 4 * 0.05), rel=1e-12)
    assert gpu["waves"] == math.ceil(gpu["partitions"] / 4)
    local = predict(cal, ASSUME, prices, 10, "local", 50)
    assert (local["cost_usd"], local["cost_basis"]) == (0.0, "own machine")
    assert local["waves"] == local["partitions"]


def test_unmeasured_partition_size_is_extrapolated(cal, prices: Prices) -> None:
    option = predict(cal, ASSUME, prices, 1, "slurm-cpu", 75)
    _, _, _, _, fixed, per_galaxy, overhead, _ = MODELS["slurm-cpu"]
    assert option["extrapolated"]
    assert option["partition_s"] == pytest.approx(
        fixed + per_galaxy * rows_per_partition(75), abs=EXACT
    )
    assert option["overhead_s"] == pytest.approx(overhead, abs=EXACT)


def test_lambda_limits_mark_options_infeasible(prices: Prices) -> None:
    runs = pd.DataFrame(
        [model_run("lambda", s, 1, per_galaxy=0.2) for s in (25, 50, 100)]
    )
    slow = calibrate(runs)
    option = predict(slow, ASSUME, prices, 1, "lambda", 100)
    assert not option["feasible"]
    assert "over Lambda's 900 s limit" in option["note"]
    tight = predict(slow, ASSUME, prices, 1, "lambda", 25, memory_mb=1024)
    assert not tight["feasible"]
    assert "MB of memory" in tight["note"]


def test_plan_table_covers_every_option(cal, prices: Prices) -> None:
    table = plan_table(cal, ASSUME, prices, [1, 100])
    per_size = 3 * 4 + 4 * 5  # three backends x 4 sizes, Lambda x 5 memory sizes
    assert len(table) == 2 * per_size
    assert set(table["backend"]) == set(MODELS)
    assert table.loc[table["partition_mb"] == 75, "extrapolated"].all()
    assert not table.loc[table["partition_mb"] == 25, "extrapolated"].any()


def option_table() -> pd.DataFrame:
    rows = [
        ("local", 900.0, 0.0),
        ("slurm-cpu", 120.0, 0.40),
        ("slurm-gpu", 60.0, 1.50),
        ("lambda", 40.0, 0.90),
        ("lambda", 30.0, 2.00),
    ]
    table = pd.DataFrame(rows, columns=["backend", "time_s", "cost_usd"])
    table["data_gb"] = 10.0
    table["partition_mb"] = 25.0
    table["memory_mb"] = math.nan
    table["feasible"] = True
    return table


def test_recommend_within_budgets() -> None:
    table = option_table()
    best = recommend(table, 10, time_budget_s=100)
    assert (best["backend"], best["cost_usd"]) == ("lambda", 0.90)
    assert best["reason"] == "cheapest within 100 s"
    best = recommend(table, 10, cost_budget_usd=1.6)
    assert (best["backend"], best["time_s"]) == ("lambda", 40.0)
    assert recommend(table, 10)["backend"] == "local"
    table.loc[0, "feasible"] = False
    assert recommend(table, 10)["backend"] == "slurm-cpu"


def test_recommend_errors_with_the_numbers() -> None:
    table = option_table()
    with pytest.raises(ConfigError, match=r"within the time budget of 10 s.*30\.0 s"):
        recommend(table, 10, time_budget_s=10)
    with pytest.raises(
        ConfigError,
        match=r"cost budget of \$0\.1; the cheapest is slurm-cpu.*\$0\.4000",
    ):
        recommend(table.iloc[1:], 10, cost_budget_usd=0.1)
    with pytest.raises(ConfigError, match="expected at most one"):
        recommend(table, 10, time_budget_s=10, cost_budget_usd=1)
    with pytest.raises(ConfigError, match="data sizes planned: 10"):
        recommend(table, 5)


def test_validate_reports_relative_errors(prices: Prices) -> None:
    runs = [model_run(b, s, d) for b in MODELS for s in (25, 100) for d in (1, 2)]
    held = [model_run(b, 50, 8, slowdown=1.1) for b in ("local", "lambda")]
    report = validate(pd.DataFrame(runs + held), [1, 2], [8], prices=prices)
    assert set(report["measure"]) == {"end_to_end_s"}
    assert len(report) == 2
    assert report["extrapolated"].all()
    assert report["rel_error"].to_numpy() == pytest.approx(1 / 1.1 - 1, abs=EXACT)
    with pytest.raises(ConfigError, match=r"hold_out data sizes \(3 GB\)"):
        validate(pd.DataFrame(runs), [1], [3])


def test_validate_compares_cost_when_recorded(prices: Prices) -> None:
    runs = pd.DataFrame(
        [model_run("slurm-cpu", s, d) for s in (25, 100) for d in (1, 4)]
    )
    runs["cost_usd"] = (
        runs["threads"] * runs["partitions"] * runs["partition_s_mean"] / 3600 * 0.05
    )
    report = validate(runs, [1], [4], prices=prices)
    cost = report[report["measure"] == "cost_usd"]
    assert len(cost) == 2
    assert cost["rel_error"].abs().max() < EXACT


def test_bad_runs_name_the_column_or_backend(cal, prices: Prices) -> None:
    runs = model_runs(("local",), (25,), (1,))
    with pytest.raises(DataFormatError, match="no column 'partition_s_mean'"):
        calibrate(runs.drop(columns="partition_s_mean"))
    bad = runs.copy()
    bad.loc[0, "end_to_end_s"] = -1.0
    with pytest.raises(DataFormatError, match=r"row 0 .*end_to_end_s is -1\.0"):
        calibrate(bad)
    with pytest.raises(ConfigError, match=r"backend 'aws-batch'.*measured: lambda"):
        predict(cal, ASSUME, prices, 1, "aws-batch", 25)
    with pytest.raises(ConfigError, match="no measured run at batch_size 64"):
        predict(cal, ASSUME, prices, 1, "local", 25, batch_size=64)
    mixed = pd.concat([runs, runs.assign(precision="bf16")])
    with pytest.raises(ConfigError, match="mix precisions bf16, fp32"):
        calibrate(mixed)
    assert calibrate(mixed, precision="bf16").precision == "bf16"


@pytest.mark.parametrize(
    ("planner", "message"),
    [
        ({"lambda_concurrency": 0}, "planner.lambda_concurrency is 0"),
        ({"lambda_cold_start_s": -1}, "planner.lambda_cold_start_s is -1"),
        ({"lambda_memory_mb": [64]}, "planner.lambda_memory_mb holds 64"),
        ({"lambda_memory_mb": []}, "planner.lambda_memory_mb is"),
        ({"lambda_vcpu_mb": 0}, "planner.lambda_vcpu_mb is 0"),
        ({"lambda_architecture": "sparc"}, "planner.lambda_architecture is 'sparc'"),
        ({"lambda_ephemeral_mb": 100}, "planner.lambda_ephemeral_mb is 100"),
        ({"slurm_slots": 1.5}, "planner.slurm_slots is 1.5"),
        ({"slurm_gpu_slots": "4"}, "planner.slurm_gpu_slots is '4'"),
        ({"slurm_scheduler_wait_s": None}, "planner.slurm_scheduler_wait_s is None"),
        ({"local_slots": True}, "planner.local_slots is True"),
        ({"partition_mb": [25, 0.001]}, "planner.partition_mb: partition size 0.001"),
        ({"partition_mb": 25}, "planner.partition_mb is 25"),
        ({"data_gb": [1, -2]}, "planner.data_gb holds -2"),
        ({"lambda_memroy_mb": [2048]}, "planner.lambda_memroy_mb is not a known key"),
    ],
)
def test_assumption_errors_name_the_key(planner: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        Assumptions.from_config(planner)


def test_assumption_defaults() -> None:
    assert Assumptions.from_config(None) == Assumptions()
    # The budgets share the section: accepted, and not assumptions.
    assert Assumptions.from_config({"time_budget_s": 60, "cost_budget_usd": None})
    given = Assumptions.from_config({"partition_mb": [10], "lambda_memory_mb": [3008]})
    assert (given.partition_mb, given.lambda_memory_mb) == ((10.0,), (3008,))


def test_cli_prints_the_plan_and_writes_tsv(tmp_path, capsys) -> None:
    runs, config, out = tmp_path / "runs.csv", tmp_path / "c.yaml", tmp_path / "p.tsv"
    model_runs(("local", "lambda"), (25, 50), (1, 2)).to_csv(runs, index=False)
    planner = {"partition_mb": [25, 50], "lambda_memory_mb": [4096, 10240]}
    config.write_text(yaml.safe_dump({"prices": PRICE_CONFIG, "planner": planner}))
    args = ["plan", "--runs", str(runs), "--data-gb", "1", "10"]
    args += ["--config", str(config), "--out", str(out)]
    assert main([*args, "--time-budget-s", "600"]) == 0
    printed = capsys.readouterr().out
    assert "time" in printed and "cost" in printed and "$0.0000" in printed
    assert "10 GB: lambda (batch 512)" in printed
    assert "cheapest within 600 s" in printed
    table = pd.read_csv(out, sep="\t")
    assert len(table) == 2 * (2 + 2 * 2)
    assert {"time_s", "cost_usd", "cost_basis", "extrapolated"} <= set(table)

    assert main([*args, "--time-budget-s", "1"]) == 2
    assert "within the time budget of 1 s" in capsys.readouterr().err
    planner["data_gb"] = [3]
    config.write_text(yaml.safe_dump({"prices": PRICE_CONFIG, "planner": planner}))
    assert main(["plan", "--runs", str(runs), "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "3 GB: local (batch 512), 50 MB partitions: " in printed  # the faster $0
    assert "cheapest (no budget given); own machine" in printed
    config.write_text(yaml.safe_dump({"prices": PRICE_CONFIG, "planner": {"x": 1}}))
    assert main(args) == 2
    assert "planner.x is not a known key" in capsys.readouterr().err
