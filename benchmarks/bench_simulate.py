"""Time ``cai.sky.simulate`` against the 2,000 galaxies/s target.

Run: ``.venv/bin/python benchmarks/bench_simulate.py [--n 20000] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from cai.sky import simulate

TARGET_GALAXIES_PER_S = 2_000.0  # required simulate throughput on a 2-core machine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20_000, help="galaxies to simulate")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        summary = simulate(Path(tmp) / "bench.h5", args.n, args.seed)
    rate = summary["galaxies_per_s"]
    print(
        f"simulate: {args.n} galaxies in {summary['seconds']:.1f} s = {rate:.0f} "
        f"galaxies/s ({rate / TARGET_GALAXIES_PER_S:.2f}x the 2,000/s target)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
