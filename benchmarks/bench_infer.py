"""Benchmark the inference engine against the model's own speed and the machine's.

Run: ``.venv/bin/python benchmarks/bench_infer.py [--quick] [--threads N]``.

Everything is measured in one run on one machine and printed as ratios, so the numbers
compare like with like whatever the hardware; nothing is asserted (it is a benchmark,
not a test). The run builds its data once in a temporary folder: ``cai.sky.simulate``
writes 5,113 galaxies (the paper's 100 MB partition), which ``partition_dataset``
splits at 100 MB (one partition) and at 25 MB (1,278 galaxies in the first).

What is measured, and why:

1. End-to-end breakdown. ``run_inference`` on the 100 MB partition at batch 512 with
   every core, in a fresh child process that writes the engine's metrics JSON: fetch
   (checksum), model load, read, compute and write seconds, and compute's share of
   their sum. Target: compute >= 90 % of infer's wall time, i.e. the engine adds
   little around the model.
2. Peak RSS against partition size. The same child on the 25 MB partition; each
   child's peak RSS is its own (fresh process). Target: no growth with partition
   size (ratio 100 MB / 25 MB <= 1.1), as the engine reads batch by batch.
3. Model throughput against batch size. ``create_model()`` under
   ``torch.inference_mode`` on random inputs [B, 5, 32, 32] and [B, 5] for B = 32 ...
   512: one warm-up call, then calls until both a minimum time and a minimum number
   of galaxies are covered. Galaxies/s are turned into GFLOP/s with the model's FLOPs
   per galaxy, counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward
   pass (a multiply-add counts as 2 FLOPs; about 1.24 GFLOP per galaxy).
4. A reference fp32 matrix multiply (2048 x 2048 @ 2048 x 2048, repeated for a few
   seconds): the rate this machine reaches on dense work, so that the model's GFLOP/s
   read as a fraction of it (at batch 512 the model should be near the matmul rate).
5. Engine against a plain PyTorch loop: the engine's compute galaxies/s from (1)
   against the in-process loop of (3) at batch 512. Target: engine >= 0.95 x loop.

``--quick`` shrinks the run (25 MB and 12.5 MB partitions, shorter timings) to check
that the script works in about a minute; its numbers are rougher.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from cai.engine import InferenceSettings, PartitionRef, run_inference
from cai.model import IMG_SIZE, IN_CHANS, AstroMAE, create_model
from cai.partition import partition_dataset, read_manifest, rows_per_partition
from cai.sky import simulate

BATCH_SIZES = (32, 64, 128, 256, 512)
ENGINE_BATCH = 512  # batch of the end-to-end runs and of the engine-vs-loop ratio
MATMUL_N = 2048  # side of the reference square matmul
FLOP_COUNT_BATCH = 8  # galaxies in the forward pass that FlopCounterMode sees
SEED = 0
TARGET_COMPUTE_SHARE = 0.90  # compute / (fetch + load + read + compute + write)
TARGET_RSS_RATIO = 1.10  # peak RSS of the large partition / the small one
TARGET_ENGINE_VS_LOOP = 0.95  # engine compute galaxies/s / plain loop galaxies/s


@dataclass(frozen=True)
class Profile:
    """Sizes and durations of one run.

    Attributes:
        galaxies: Galaxies simulated: one partition of ``large_mb``.
        large_mb: Partition size of the end-to-end run (the data set is one of these).
        small_mb: The smaller partition size of the peak RSS comparison.
        min_seconds: Each batch size is timed for at least this long ...
        min_galaxies: ... and over at least this many galaxies, unless ...
        max_seconds: ... this much time has passed (bounds a run on a slow machine).
        matmul_seconds: Duration of the reference matmul timing.
    """

    galaxies: int
    large_mb: float
    small_mb: float
    min_seconds: float
    min_galaxies: int
    max_seconds: float
    matmul_seconds: float


FULL = Profile(5113, 100.0, 25.0, 3.0, 1024, 15.0, 3.0)
QUICK = Profile(1278, 25.0, 12.5, 1.0, 256, 5.0, 1.0)


def default_threads() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def say(line: str) -> None:
    print(line, flush=True)


class Background:
    """CPU time other processes take while a section runs, as a share of all cores.

    Busy time of the whole machine (``/proc/stat``) minus this process's and its
    children's CPU time. Others' work on a shared machine slows every measurement, so a
    high share marks the ratios of that section as unreliable. Linux only; elsewhere
    the share is NaN.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _machine_busy_s() -> float:
        try:
            with open("/proc/stat") as fh:
                fields = [int(v) for v in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return float("nan")
        user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
        return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")

    @classmethod
    def _sample(cls) -> tuple[float, float, float]:
        own = sum(os.times()[:4])  # user + system, self and waited-for children
        return time.perf_counter(), cls._machine_busy_s(), own

    def share(self) -> float:
        """Others' CPU time since construction over (elapsed x cores)."""
        wall, busy, own = (
            b - a for a, b in zip(self._start, self._sample(), strict=True)
        )
        cores = os.cpu_count() or 1
        return max(0.0, busy - own) / (wall * cores) if wall > 0 else float("nan")


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def build_data(work: Path, profile: Profile) -> tuple[Path, Path, str]:
    """Simulate one large partition of galaxies and partition it at both sizes.

    Returns the large and small manifest folders and a line describing them.
    """
    rows = min(profile.galaxies, rows_per_partition(profile.large_mb))
    source = work / "galaxies.h5"
    summary = simulate(source, rows, SEED)
    large_dir = work / f"parts-{profile.large_mb:g}mb"
    small_dir = work / f"parts-{profile.small_mb:g}mb"
    tick = time.perf_counter()
    large = partition_dataset(source, large_dir, profile.large_mb)
    small = partition_dataset(source, small_dir, profile.small_mb)
    seconds = time.perf_counter() - tick
    line = (
        f"data: simulated {rows} galaxies in {summary['seconds']:.1f} s; partitioned "
        f"in {seconds:.1f} s: {profile.large_mb:g} MB -> "
        f"{[p['rows'] for p in large['partitions']]}, {profile.small_mb:g} MB -> "
        f"{[p['rows'] for p in small['partitions']]} galaxies"
    )
    return large_dir, small_dir, line


# --------------------------------------------------------------------------------------
# End-to-end runs, each in a fresh process
# --------------------------------------------------------------------------------------


def child_main(
    manifest_dir: Path, index: int, out: Path, batch: int, threads: int
) -> int:
    """Run the engine on partition ``index`` of a manifest; it writes metrics.json."""
    entry = read_manifest(manifest_dir)["partitions"][index]
    run_inference(
        [PartitionRef.from_manifest(entry)],
        out / "predictions.parquet",
        out / "metrics.json",
        InferenceSettings(batch_size=batch, threads=threads, backend="bench"),
        seed=SEED,
    )
    return 0


@dataclass(frozen=True)
class EngineRun:
    """The engine's record of one partition, and the child process's wall time."""

    record: dict[str, Any]
    process_s: float

    @property
    def rows(self) -> int:
        return int(self.record["rows"])

    @property
    def total_s(self) -> float:
        r = self.record
        return (
            r["fetch_s"]
            + r["model_load_s"]
            + r["read_s"]
            + r["compute_s"]
            + r["write_s"]
        )

    @property
    def compute_share(self) -> float:
        return self.record["compute_s"] / self.total_s

    @property
    def compute_rate(self) -> float:
        return self.rows / self.record["compute_s"]

    @property
    def peak_rss_mb(self) -> float:
        return float(self.record["peak_rss_mb"])


def run_child(manifest_dir: Path, out: Path, batch: int, threads: int) -> EngineRun:
    """Run :func:`child_main` on the manifest's first partition in a new interpreter."""
    out.mkdir(parents=True)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        str(manifest_dir),
        "--partition",
        "0",
        "--out",
        str(out),
        "--batch",
        str(batch),
        "--threads",
        str(threads),
    ]
    tick = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    process_s = time.perf_counter() - tick
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise RuntimeError(f"engine child failed (exit {done.returncode}): {command}")
    metrics = json.loads((out / "metrics.json").read_text())
    return EngineRun(metrics["partitions"][0], process_s)


def breakdown_line(run: EngineRun, size_mb: float) -> str:
    r = run.record
    share = run.compute_share
    met = verdict(share >= TARGET_COMPUTE_SHARE)
    return (
        f"infer {size_mb:g} MB ({run.rows} galaxies, batch {r['batch_size']}): "
        f"fetch {r['fetch_s']:.2f} s, load {r['model_load_s']:.2f} s, "
        f"read {r['read_s']:.2f} s, compute {r['compute_s']:.1f} s, "
        f"write {r['write_s']:.2f} s -> compute {share:.1%} of wall "
        f"(target >= {TARGET_COMPUTE_SHARE:.0%}: {met})"
    )


# --------------------------------------------------------------------------------------
# In-process model and matmul timings
# --------------------------------------------------------------------------------------


def random_inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED)
    image = torch.randn(batch, IN_CHANS, IMG_SIZE, IMG_SIZE, generator=generator)
    magnitudes = torch.randn(batch, IN_CHANS, generator=generator)
    return image, magnitudes


def flops_per_galaxy(model: AstroMAE) -> float:
    """Model FLOPs per galaxy of one forward pass (multiply-add = 2 FLOPs)."""
    image, magnitudes = random_inputs(FLOP_COUNT_BATCH)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(image, magnitudes)
    return counter.get_total_flops() / FLOP_COUNT_BATCH


def model_rate(model: AstroMAE, batch: int, profile: Profile) -> tuple[float, float]:
    """Galaxies/s of the plain model at ``batch`` after one warm-up call.

    Times calls until ``profile.min_seconds`` and ``profile.min_galaxies`` are both
    covered, or ``profile.max_seconds`` have passed.

    Returns the mean rate over all timed calls and the rate of the fastest call (the
    least disturbed by other work on the machine).
    """
    image, magnitudes = random_inputs(batch)
    with torch.inference_mode():
        model(image, magnitudes)
        fastest = float("inf")
        calls = 0
        start = time.perf_counter()
        while True:
            tick = time.perf_counter()
            model(image, magnitudes)
            tock = time.perf_counter()
            fastest = min(fastest, tock - tick)
            calls += 1
            elapsed = tock - start
            enough = (
                elapsed >= profile.min_seconds and calls * batch >= profile.min_galaxies
            )
            if enough or elapsed >= profile.max_seconds:
                return calls * batch / elapsed, batch / fastest


def matmul_gflops(n: int, min_seconds: float) -> tuple[float, float, int, float]:
    """GFLOP/s of fp32 [n, n] @ [n, n] after one warm-up call.

    Returns the mean rate, the fastest call's rate, the calls and the seconds timed.
    """
    generator = torch.Generator().manual_seed(SEED)
    a = torch.randn(n, n, generator=generator)
    b = torch.randn(n, n, generator=generator)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)
    fastest = float("inf")
    calls = 0
    start = time.perf_counter()
    while (tick := time.perf_counter()) - start < min_seconds or calls == 0:
        torch.mm(a, b, out=c)
        fastest = min(fastest, time.perf_counter() - tick)
        calls += 1
    elapsed = time.perf_counter() - start
    flop = 2.0 * n**3
    return flop * calls / elapsed / 1e9, flop / fastest / 1e9, calls, elapsed


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        epilog="Prints ratios measured in one run; asserts nothing.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller partitions, shorter timings"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=default_threads(),
        help="torch threads for every measurement (default: all cores)",
    )
    parser.add_argument(
        "--min-galaxies",
        type=int,
        default=None,
        help="galaxies timed per batch size at least (default 1024; 256 with --quick)",
    )
    # The end-to-end child process (internal).
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--partition", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--batch", type=int, default=ENGINE_BATCH, help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        return child_main(
            args.child, args.partition, args.out, args.batch, args.threads
        )
    profile = QUICK if args.quick else FULL
    if args.min_galaxies is not None:
        profile = dataclasses.replace(profile, min_galaxies=args.min_galaxies)
    threads = args.threads
    torch.set_num_threads(threads)
    logging.getLogger("cai.model").setLevel(logging.ERROR)  # the untrained warning
    header = f"== bench_infer ({threads} threads, torch {torch.__version__}) =="
    say(header + (" [quick]" if args.quick else ""))
    summary: list[str] = []

    with tempfile.TemporaryDirectory(prefix="bench_infer.") as tmp:
        work = Path(tmp)
        large_dir, small_dir, data_line = build_data(work, profile)
        say(data_line)

        # 1. End-to-end breakdown on the large partition (fresh process).
        engine_load = Background()
        large = run_child(large_dir, work / "run-large", ENGINE_BATCH, threads)
        line = breakdown_line(large, profile.large_mb)
        say(line)
        summary.append(line)
        say(
            f"  engine compute {large.compute_rate:.1f} galaxies/s; child process "
            f"{large.process_s:.1f} s including interpreter start and imports"
        )

        # 2. Peak RSS: the same child on the small partition.
        small = run_child(small_dir, work / "run-small", ENGINE_BATCH, threads)
        say(breakdown_line(small, profile.small_mb))
        ratio = large.peak_rss_mb / small.peak_rss_mb
        line = (
            f"peak RSS: {profile.small_mb:g} MB partition {small.peak_rss_mb:.0f} MiB, "
            f"{profile.large_mb:g} MB partition {large.peak_rss_mb:.0f} MiB, "
            f"ratio {ratio:.2f} (target <= {TARGET_RSS_RATIO:.2f}, no growth: "
            f"{verdict(ratio <= TARGET_RSS_RATIO)})"
        )
        say(line)
        summary.append(line)
        engine_share = engine_load.share()

    # 3. and 4. Model FLOPs, reference matmul, model throughput per batch size.
    loop_load = Background()
    model, _ = create_model(seed=SEED)
    flops = flops_per_galaxy(model)
    line = (
        f"model: {flops / 1e9:.3f} GFLOP per galaxy (FlopCounterMode, "
        "multiply-add = 2 FLOPs; expected ~1.24)"
    )
    say(line)
    summary.append(line)
    matmul, best, calls, seconds = matmul_gflops(MATMUL_N, profile.matmul_seconds)
    matmul_line = (
        f"matmul fp32 {MATMUL_N}^3: {matmul:.0f} GFLOP/s ({calls} calls in "
        f"{seconds:.1f} s; fastest call {best:.0f} GFLOP/s)"
    )
    say(matmul_line)
    rates: dict[int, float] = {}
    for batch in BATCH_SIZES:
        rates[batch], best = model_rate(model, batch, profile)
        gflops = rates[batch] * flops / 1e9
        line = (
            f"batch {batch}: {rates[batch]:.1f} galaxies/s, {gflops:.0f} GFLOP/s, "
            f"{gflops / matmul:.2f}x matmul (fastest call {best:.1f} galaxies/s)"
        )
        say(line)
        summary.append(line)
    summary.append(matmul_line)

    # 5. Engine against the plain loop at the engine's batch size.
    ratio = large.compute_rate / rates[ENGINE_BATCH]
    line = (
        f"engine vs plain loop at batch {ENGINE_BATCH}: {ratio:.2f}x "
        f"(engine compute {large.compute_rate:.1f} galaxies/s, plain loop "
        f"{rates[ENGINE_BATCH]:.1f} galaxies/s; target >= {TARGET_ENGINE_VS_LOOP}: "
        f"{verdict(ratio >= TARGET_ENGINE_VS_LOOP)})"
    )
    say(line)
    summary.append(line)
    line = (
        f"other processes' CPU load: {engine_share:.0%} of the cores during the engine "
        f"runs, {loop_load.share():.0%} during the in-process timings (ratios are only "
        "trustworthy when both are near 0%)"
    )
    say(line)
    summary.append(line)

    say("")
    say(header)
    for line in summary:
        say(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
