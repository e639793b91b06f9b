"""Lower precision against fp32: model speed, end-to-end infer, and model load time.

Run: ``.venv/bin/python benchmarks/bench_precision.py [--compile] [--threads N]``.

All numbers come from one run on one machine, with the same weights (AstroMAE, seed
0, saved as a safetensors checkpoint and loaded from it) and the same inputs (synthetic
galaxies); nothing is asserted.

1. Model galaxies/s at batch 512 for fp32, bf16 and int8 (``cai.precision``): one
   warm-up batch, then the best of three timed batches, under ``inference_mode``;
   ratios to fp32. Targets: bf16 >= 1.8x, int8 >= 2.5x.
2. The accuracy gate on 2,048 labelled synthetic galaxies (the rule's computation):
   which precisions pass, and the fastest that does.
3. End-to-end ``run_inference`` on one 100 MB partition (5,113 galaxies) at fp32 and at
   the fastest passing precision: galaxies over the job's wall time (model load and
   conversion, checksum, read, compute, write). Target: >= 1.8x fp32.
4. Model load to first prediction: ``create_model`` from the checkpoint plus one
   forward pass of one galaxy, and each precision's conversion on top. Target: <= 1 s.
``--compile`` also times ``torch.compile`` (fp32 and bf16) against eager: its compile
seconds and its galaxies/s afterwards.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from cai.engine import InferenceSettings, run_inference, usable_threads
from cai.model import ModelConfig, create_model, save_checkpoint
from cai.partition import partition_dataset, planned_partitions, read_manifest
from cai.precision import (
    PRECISIONS,
    GateLimits,
    best_passing,
    prepare_model,
    run_gate,
    to_model_input,
)
from cai.sky import simulate, simulate_chunk

BATCH = 512
TARGETS = {"bf16": 1.8, "int8": 2.5}
E2E_TARGET = 1.8
LOAD_TARGET_S = 1.0
PARTITION_ROWS = 5113  # the paper's 100 MB partition


def model_rate(model, image, magnitudes, precision: str) -> float:
    """Best galaxies/s of three timed batches after one warm-up."""
    inputs = to_model_input(image, magnitudes, precision)
    with torch.inference_mode():
        model(*inputs)
        best = float("inf")
        for _ in range(3):
            tick = time.perf_counter()
            model(*inputs)
            best = min(best, time.perf_counter() - tick)
    return len(image) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    threads = usable_threads(args.threads)
    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="cai-bench-precision-"))
    seeded, _ = create_model(ModelConfig(), None, 0)
    checkpoint = tmp / "astromae.safetensors"
    save_checkpoint(seeded, checkpoint, {"weights": "untrained weights (seed 0)"})

    # 4 first: a cold process, as a job starts.
    one = simulate_chunk(1, 7, 0, 1)
    tick = time.perf_counter()
    model, _ = create_model(ModelConfig(), checkpoint)
    load_s = time.perf_counter() - tick
    with torch.inference_mode():
        model(torch.from_numpy(one.image), torch.from_numpy(one.magnitudes))
    first_s = time.perf_counter() - tick
    conversions = {}
    for precision in ("bf16", "int8"):
        tick = time.perf_counter()
        prepare_model(model, precision)
        conversions[precision] = time.perf_counter() - tick

    batch = simulate_chunk(BATCH, 11, 0, 1)
    image = torch.from_numpy(batch.image)
    magnitudes = torch.from_numpy(batch.magnitudes)
    rates = {
        p: model_rate(prepare_model(model, p), image, magnitudes, p) for p in PRECISIONS
    }
    print(
        f"model galaxies/s at batch {BATCH}, {threads} threads, same weights and inputs:"
    )
    for precision, rate in rates.items():
        ratio = rate / rates["fp32"]
        goal = ""
        if precision in TARGETS:
            met = "met" if ratio >= TARGETS[precision] else "NOT met"
            goal = f" (target >= {TARGETS[precision]}x: {met})"
        print(f"  {precision:5s} {rate:8.1f}  {ratio:5.2f}x fp32{goal}")

    simulate(tmp / "galaxies.h5", PARTITION_ROWS, 42, 1)
    partition_dataset(tmp / "galaxies.h5", tmp / "parts", 100)
    rows = run_gate(
        tmp / "parts",
        list(PRECISIONS),
        2048,
        BATCH,
        threads,
        GateLimits(),
        tmp / "gate.tsv",
        ModelConfig(),
        checkpoint,
    )
    best = best_passing(rows)
    print(
        "\naccuracy gate, 2,048 labelled galaxies (max |dz| <= 1e-3, NMAD within 1%):"
    )
    for row in rows:
        verdict = "passes" if row["passes"] else f"FAILS ({row['reason']})"
        print(
            f"  {row['precision']:5s} max |dz_pred| {row['max_abs_dz_pred']:.2e}, "
            f"NMAD {100 * row['nmad_change_frac']:+.2f}%: {verdict}"
        )

    parts = planned_partitions(read_manifest(tmp / "parts"))
    e2e = {}
    for precision in dict.fromkeys(["fp32", best]):
        metrics = run_inference(
            parts,
            tmp / f"{precision}.parquet",
            tmp / f"{precision}.json",
            InferenceSettings(batch_size=BATCH, threads=threads, precision=precision),
            ModelConfig(),
            checkpoint,
        )
        job = metrics["job"]
        e2e[precision] = job["rows"] / job["wall_s"]
        record = metrics["partitions"][0]
        print(
            f"\nend to end, {precision}, one 100 MB partition ({job['rows']} galaxies): "
            f"{job['wall_s']:.2f} s = {e2e[precision]:.1f} galaxies/s (model load "
            f"{record['model_load_s']:.2f} s, checksum {record['fetch_s']:.2f} s, read "
            f"wait {record['read_s']:.2f} s, compute {record['compute_s']:.2f} s, write "
            f"{record['write_s']:.2f} s)"
        )
    ratio = e2e[best] / e2e["fp32"]
    print(
        f"end to end at {best} (fastest passing the gate): {ratio:.2f}x fp32 (target "
        f">= {E2E_TARGET}x: {'met' if ratio >= E2E_TARGET else 'NOT met'})"
    )
    print(
        f"\nmodel load to first prediction (48 M parameters, safetensors): load "
        f"{load_s:.3f} s, first prediction at {first_s:.3f} s (target <= "
        f"{LOAD_TARGET_S} s: {'met' if first_s <= LOAD_TARGET_S else 'NOT met'}); "
        + ", ".join(f"{p} conversion +{s:.2f} s" for p, s in conversions.items())
    )

    if args.compile:
        for precision in ("fp32", "bf16"):
            prepared = prepare_model(model, precision)
            tick = time.perf_counter()
            compiled = torch.compile(prepared)
            with torch.inference_mode():
                compiled(*to_model_input(image[:BATCH], magnitudes[:BATCH], precision))
            compile_s = time.perf_counter() - tick
            rate = model_rate(compiled, image, magnitudes, precision)
            print(
                f"torch.compile {precision}: compiled in {compile_s:.1f} s, then "
                f"{rate:.1f} galaxies/s = {rate / rates[precision]:.2f}x eager {precision}"
            )


if __name__ == "__main__":
    main()
