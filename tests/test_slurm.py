"""The workflow on a real SLURM cluster (localhost) through --profile profiles/slurm.

The cluster is the project's own throwaway one (profiles/slurm/local-cluster.sh): the
tests start it when it is not up and stop it afterwards. Where it cannot start, the
tests skip, except in CI (CI=true), where that is an error.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
CLUSTER = REPO / "profiles/slurm/local-cluster.sh"
TINY = {
    "data": {"synthetic": {"n_galaxies": 60, "seed": 7}},
    "partition": {"size_mb": 0.5},  # 25 galaxies a partition: 25, 25, 10
    "inference": {"threads": 1},
    "finetune": {"train": False},  # 60 galaxies are too few to fine-tune on
}
JOB_IDS = ["00000", "00001", "00002"]

pytestmark = pytest.mark.slurm


def cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return state.returncode == 0 and state.stdout.strip() in {
        "idle",
        "mixed",
        "allocated",
    }


@pytest.fixture(scope="module")
def slurm():
    """A running local SLURM cluster with accounting, for the tests of this module."""
    started_here = False
    if not cluster_up():
        result = subprocess.run(
            ["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=900
        )
        if result.returncode != 0 or not cluster_up():
            output = f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
            reason = f"local SLURM cluster did not start:\n{output}"
            if os.environ.get("CI") == "true":
                pytest.fail(reason)
            pytest.skip(reason)
        started_here = True
    yield
    if started_here:
        subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=120)


def run(
    workdir: Path,
    *args: str,
    profile: bool = True,
    settings: dict | None = None,
    timeout: int = 900,
):
    """Snakemake on the tiny config (or ``settings``) in ``workdir``, through the SLURM
    profile unless ``profile`` is False.

    On timeout Snakemake gets SIGINT, which cancels its SLURM jobs (SIGTERM does not).
    """
    config = workdir / "tiny.yaml"
    config.write_text(yaml.safe_dump(settings or TINY))
    command = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile")]
    if profile:
        # The profile's own configfile line is replaced by ours: list both.
        backend = REPO / "profiles/slurm/backend.yaml"
        command += ["--profile", str(REPO / "profiles/slurm")]
        command += ["--configfile", str(backend), str(config)]
    else:
        command += ["--configfile", str(config), "--cores", "2"]
    process = subprocess.Popen(
        [*command, *args],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
        pytest.fail(f"snakemake ran past {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def check(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def sacct(since: str) -> list[dict[str, str]]:
    """Jobs accounted since ``since``, one dict per job or array task (sacct -X)."""
    fields = ["JobID", "JobName", "State", "ReqMem", "AllocCPUS"]
    for _ in range(30):  # sacct shows a job about a second after it ends
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-S", since, "-o", ",".join(fields)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows = [
            dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines()
        ]
        if rows and all(r["State"] not in {"PENDING", "RUNNING"} for r in rows):
            return rows
        time.sleep(1)
    return rows


def job_files(workdir: Path, backend: str) -> dict[str, int]:
    jobs = workdir / f"results/{backend}/dataset/0.5MB-b512/r1/jobs"
    return (
        {p.name: p.stat().st_mtime_ns for p in jobs.iterdir()} if jobs.exists() else {}
    )


def test_tiny_workflow_on_slurm_matches_local_and_uses_arrays(slurm, tmp_path):
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    check(run(tmp_path))
    slurm_run = tmp_path / "results/slurm-cpu/dataset/0.5MB-b512/r1"
    for name in (
        "catalogue.parquet",
        "partition_metrics.tsv",
        "summary.json",
        "accuracy.tsv",
    ):
        assert (slurm_run / name).is_file(), name
    for plot in ("redshift_density", "partition_times", "partition_throughput"):
        assert (slurm_run / "plots" / f"{plot}.png").is_file()

    jobs = sacct(since)
    tasks = [j for j in jobs if re.fullmatch(r"\d+_\d+", j["JobID"])]
    assert len(tasks) >= 3, jobs
    assert all(j["State"] == "COMPLETED" for j in jobs), jobs
    assert {j["AllocCPUS"] for j in tasks} == {"1"}  # inference.threads

    # The same inputs and weights through the local backend: the same predictions.
    check(run(tmp_path, profile=False))
    local = pq.read_table(
        tmp_path / "results/local/dataset/0.5MB-b512/r1/catalogue.parquet"
    )
    remote = pq.read_table(slurm_run / "catalogue.parquet")
    assert remote["object_id"].to_pylist() == local["object_id"].to_pylist()
    np.testing.assert_allclose(
        remote["z_pred"].to_numpy(), local["z_pred"].to_numpy(), rtol=0, atol=1e-6
    )
    summary = yaml.safe_load((slurm_run / "summary.json").read_text())
    assert summary["backend"] == "slurm-cpu" and summary["rows"] == 60

    check(run(tmp_path, "--report", "results/report.html"))
    assert "slurm-cpu" in (tmp_path / "results/report.html").read_text()


def test_failing_partition_is_retried_with_more_memory_then_named(slurm, tmp_path):
    check(run(tmp_path, "--until", "partition", profile=False))
    part = tmp_path / "results/partitions/0.5MB/part-00001.h5"
    good = part.read_bytes()
    part.write_bytes(good[:1000] + bytes(100) + good[1100:])  # corrupt, same size

    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    # Up to the aggregation: the precision gate (which reads the same partitions)
    # would be one more failed job.
    result = run(tmp_path, "--keep-going", "--until", "aggregate")
    assert result.returncode != 0
    log = tmp_path / "results/logs/slurm-cpu/dataset/0.5MB-b512/r1/infer-job-00001.log"
    assert "ChecksumError" in log.read_text() and "part-00001.h5" in log.read_text()
    assert "infer-job-00001.log" in result.stderr

    failed = [j for j in sacct(since) if j["State"] == "FAILED"]
    assert len(failed) == 3, failed  # the first attempt and two retries
    # cluster.mem_mb.infer is 2000 MiB, doubled on each retry (an array task asks for
    # a few MiB more: the plugin's allowance for the encoded job payload)
    memory = sorted(int(re.sub(r"\D", "", j["ReqMem"])) for j in failed)
    assert memory == pytest.approx([2000, 4000, 8000], rel=0.01), failed

    done = job_files(tmp_path, "slurm-cpu")
    assert sorted(done) == sorted(
        f"job-{j}.{e}" for j in ("00000", "00002") for e in ("json", "parquet")
    )
    part.write_bytes(good)
    check(run(tmp_path))
    after = job_files(tmp_path, "slurm-cpu")
    assert all(after[name] == stamp for name, stamp in done.items())
    assert sorted(after) == sorted(
        f"job-{j}.{e}" for j in JOB_IDS for e in ("json", "parquet")
    )


def test_job_killed_at_its_time_limit_is_reported_as_timeout(slurm, tmp_path):
    """One 8,000-galaxy partition on 1 CPU needs about 100 s; the limit is 1 minute."""
    settings = {
        "data": {"synthetic": {"n_galaxies": 8000, "seed": 7}},
        "partition": {"size_mb": 200},
        "inference": {"threads": 1},
        "cluster": {"retries": 0, "runtime": {"infer": 1}},
        "finetune": {"train": False},
    }
    check(run(tmp_path, "--until", "partition", profile=False, settings=settings))
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    result = run(tmp_path, "--until", "aggregate", settings=settings)
    assert result.returncode != 0
    assert "SLURM status is: 'TIMEOUT'" in result.stdout + result.stderr
    assert [j["State"] for j in sacct(since)] == ["TIMEOUT"]
    # SLURM sent SIGTERM before the kill: the job unwound and left no file, not even
    # its temporary
    assert not list(
        (tmp_path / "results/slurm-cpu/dataset/200MB-b512/r1/jobs").glob("*")
    )
    log = tmp_path / "results/logs/slurm-cpu/dataset/200MB-b512/r1/infer-job-00000.log"
    assert "received SIGTERM" in log.read_text()


def test_dry_run_of_the_1_tb_plan(tmp_path):
    """The paper's 1 TB at 100 MB: 10,486 partitions in 954 array-sized jobs, no run."""
    result = check(
        run(
            tmp_path,
            "--dry-run",
            "--config",
            "data={size_gb: 1024}",
            "partition={size_mb: 100}",
        )
    )
    assert re.search(r"^infer\s+954$", result.stdout, re.MULTILINE), result.stdout[
        -2000:
    ]
    assert not (tmp_path / "results").exists()
