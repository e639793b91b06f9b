"""SLURM backend: planning time of the paper's 1 TB runs, and scheduling overhead.

Run: ``.venv/bin/python benchmarks/bench_slurm.py [--skip-run] [--uncapped]``.

1. ``snakemake --profile profiles/slurm --dry-run`` of the paper's 1 TB data size at
   100 MB and at 25 MB partitions (10,486 and 41,944 partitions, grouped into at most
   ``inference.max_jobs`` = 1000 jobs): seconds and job counts, against the targets of
   60 s and 120 s. ``--uncapped`` also plans one job per partition, to show what the
   cap saves.
2. Scheduling overhead: the tiny workflow (60 galaxies, 3 partitions) end to end on the
   local backend and through the SLURM profile on the local cluster
   (profiles/slurm/local-cluster.sh, started if it is not up), in one run; the ratio
   of their wall times is what SLURM submission, arrays and status polling add.
   ``--skip-run`` leaves this part out.
Each number is measured once in this run on this machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
PROFILE = ["--profile", str(REPO / "profiles/slurm")]
BACKEND = str(REPO / "profiles/slurm/backend.yaml")
DRY_RUN_TARGETS_S = {100: 60.0, 25: 120.0}  # partition MB -> most seconds allowed
TINY = (
    "data: {synthetic: {n_galaxies: 60, seed: 7}}\n"
    "partition: {size_mb: 0.5}\n"
    "inference: {threads: 1}\n"
    "finetune: {train: false}\n"
)


def snakemake(workdir: Path, *args: str) -> tuple[float, subprocess.CompletedProcess]:
    """Run snakemake on the repository's Snakefile in ``workdir``; seconds and result."""
    command = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), *args]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-2000:] + result.stderr[-4000:])
        raise SystemExit(f"snakemake {' '.join(args)} failed")
    return seconds, result


def job_count(output: str, rule: str) -> int:
    match = re.search(rf"^{rule}\s+(\d+)$", output, re.MULTILINE)
    return int(match.group(1)) if match else 0


def bench_dry_run(uncapped: bool) -> None:
    cases = [(size, None) for size in (100, 25)]
    if uncapped:
        cases.append((100, "inference={partitions_per_job: 1, max_jobs: 100000}"))
    for size_mb, extra in cases:
        with tempfile.TemporaryDirectory() as tmp:
            config = ["data={size_gb: 1024}", f"partition={{size_mb: {size_mb}}}"]
            config += [extra] if extra else []
            args = [*PROFILE, "--configfile", BACKEND, "--dry-run", "--config", *config]
            seconds, result = snakemake(Path(tmp), *args)
        jobs = job_count(result.stdout, "infer")
        total = job_count(result.stdout, "total")
        label = "one job per partition" if extra else "capped at 1000 jobs"
        target = "" if extra else f" (target <= {DRY_RUN_TARGETS_S[size_mb]:.0f} s)"
        print(
            f"dry-run 1 TB at {size_mb} MB, {label}: {jobs} inference jobs, {total} "
            f"jobs in all, {seconds:.1f} s{target}"
        )


def cluster_up() -> bool:
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return state.returncode == 0 and state.stdout.strip() in {"idle", "mixed"}


def bench_overhead() -> None:
    cluster = REPO / "profiles/slurm/local-cluster.sh"
    started_here = False
    if not cluster_up():
        subprocess.run(["bash", str(cluster), "start"], check=True, capture_output=True)
        started_here = True
    try:
        seconds = {}
        with (
            tempfile.TemporaryDirectory() as local,
            tempfile.TemporaryDirectory() as remote,
        ):
            for name, workdir, args in (
                ("local", local, ["--cores", "2"]),
                ("slurm", remote, [*PROFILE, "--configfile", BACKEND]),
            ):
                (Path(workdir) / "tiny.yaml").write_text(TINY)
                configfile = [] if name == "slurm" else ["--configfile"]
                seconds[name], _ = snakemake(
                    Path(workdir), *args, *configfile, str(Path(workdir) / "tiny.yaml")
                )
        print(
            f"tiny workflow (60 galaxies, 3 partitions): local {seconds['local']:.1f} s, "
            f"SLURM {seconds['slurm']:.1f} s, ratio {seconds['slurm'] / seconds['local']:.2f}"
        )
    finally:
        if started_here:
            subprocess.run(["bash", str(cluster), "stop"], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-run", action="store_true", help="dry runs only")
    parser.add_argument(
        "--uncapped", action="store_true", help="also plan 1 job/partition"
    )
    args = parser.parse_args(argv)
    print("== bench_slurm ==")
    bench_dry_run(args.uncapped)
    if not args.skip_run:
        bench_overhead()
    return 0


if __name__ == "__main__":
    sys.exit(main())
