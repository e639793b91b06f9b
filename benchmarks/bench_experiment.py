"""The paper's experiment as one DAG: how long planning it takes.

Run: ``.venv/bin/python benchmarks/bench_experiment.py [--experiment paper]``.

``snakemake --profile profiles/slurm --configfile config/experiments/<name>.yaml
experiment --dry-run`` in an empty folder: the whole sweep (every backend, data size
up to 1 TB, partition size, batch size and repeat) planned, nothing run. Prints the
seconds, the number of runs and of jobs per rule, against the target of 120 s. The
data set is not even simulated: planning needs only the config.
Measured once in this run on this machine; nothing is asserted.
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
TARGET_S = 120.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--experiment", default="paper", help="config/experiments/<name>.yaml"
    )
    args = parser.parse_args()
    configfile = REPO / "config/experiments" / f"{args.experiment}.yaml"
    command = [
        str(SNAKEMAKE),
        "-s",
        str(REPO / "Snakefile"),
        "--profile",
        str(REPO / "profiles/slurm"),
        "--configfile",
        str(configfile),
        "--dry-run",
        "--quiet",
        "rules",
        "--",
        "experiment",
    ]
    with tempfile.TemporaryDirectory(prefix="cai-bench-experiment-") as workdir:
        started = time.perf_counter()
        result = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
        seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-3000:] + result.stderr[-3000:])
        raise SystemExit("the dry run failed")
    counts = {
        rule: int(n)
        for rule, n in re.findall(r"^(\w+)\s+(\d+)$", result.stdout, re.MULTILINE)
    }
    total = counts.pop("total")
    runs = counts.get("aggregate", 0)
    print(f"dry run of config/experiments/{args.experiment}.yaml (experiment target)")
    print(f"  runs (aggregate jobs): {runs:,}")
    for rule, n in sorted(counts.items(), key=lambda item: -item[1]):
        print(f"  {rule:<20} {n:>8,}")
    print(f"  {'total jobs':<20} {total:>8,}")
    verdict = "within" if seconds <= TARGET_S else "OVER"
    print(
        f"planned in {seconds:.1f} s ({total / seconds:,.0f} jobs/s): {verdict} the "
        f"target of {TARGET_S:.0f} s ({seconds / TARGET_S:.2f}x of it)"
    )


if __name__ == "__main__":
    main()
