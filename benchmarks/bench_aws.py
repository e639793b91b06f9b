"""AWS backend on the local stack: dispatcher throughput, and cold versus warm handler.

Run: ``.venv/bin/python benchmarks/bench_aws.py [--invocations 2000] [--slots 16]``.

1. Dispatcher throughput: ``cai.dispatch.dispatch`` (the code the workflow runs, with
   its retries and records) against the local stack (moto + router + one Lambda
   Runtime Interface Emulator per slot) running a no-op handler, ``--slots`` slots
   and as many invocations in flight. Prints invocations/s and the dispatcher's own CPU
   seconds per invocation (process time of this process, all threads), against the
   target of at least 100 invocations/s.
2. The real handler (lambda/handler.py) on one 25 MB partition (1,278 galaxies), first
   on a fresh slot (cold: runtime start with Python, torch and cai imports, model fetch
   from S3 and load) and then three times on the same, now warm, slot: the handler's
   split into init, model fetch, model load, partition fetch from S3, compute and
   upload, and the round trip seen by the dispatcher.
Each number is measured once in this run on this machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import boto3
import yaml

from cai.dispatch import RetryPolicy, dispatch, lambda_client
from cai.lambda_run import plan_events, stage_run
from cai.localaws import LocalAws
from cai.partition import partition_dataset, rows_per_partition
from cai.sky import simulate
from cai.staging import read_receipt

REPO = Path(__file__).resolve().parents[1]
TARGET_PER_S = 100.0
MODEL = {"checkpoint": None, "depth": 12, "num_heads": 8, "seed": 0}
PARTITION_MB = 25
WARM_REPEATS = 3


def use_stack(stack: LocalAws) -> None:
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[key]
    os.environ.update(stack.env())


def bench_dispatcher(workdir: Path, slots: int, invocations: int) -> None:
    stack = LocalAws.start(
        workdir / "noop-stack",
        slots=slots,
        handler="echo.noop",
        handler_dir=REPO / "tests/lambda_handlers",
        timeout_s=60,
        memory_mb=128,
    )
    with stack:
        use_stack(stack)
        client = lambda_client(boto3.session.Session(), 60, slots)
        policy = RetryPolicy(max_attempts=4, base_s=0.05, cap_s=1.0)
        warm = [(n, {"n": n}) for n in range(4 * slots)]
        dispatch(client, "cai-noop", warm, slots, policy)  # start every runtime
        events = [(n, {"n": n}) for n in range(invocations)]
        cpu = time.process_time()
        tick = time.perf_counter()
        records = dispatch(client, "cai-noop", events, slots, policy)
        wall = time.perf_counter() - tick
        cpu = time.process_time() - cpu
    ok = sum(r["status"] == "ok" for r in records)
    throttled = sum(r["throttles"] for r in records)
    rate = invocations / wall
    print(
        f"dispatcher, {slots} slots, no-op handler: {invocations} invocations in "
        f"{wall:.2f} s = {rate:.0f} invocations/s ({rate / TARGET_PER_S:.1f}x the "
        f"{TARGET_PER_S:.0f}/s target); {ok} ok, {throttled} throttled attempts; "
        f"dispatcher CPU {1000 * cpu / invocations:.2f} ms per invocation "
        f"({cpu:.2f} s in all)"
    )


def bench_handler(workdir: Path) -> None:
    rows = rows_per_partition(PARTITION_MB)
    simulate(workdir / "galaxies.h5", rows, 42, 1)
    partition_dataset(workdir / "galaxies.h5", workdir / "parts", PARTITION_MB)
    aws = yaml.safe_load((REPO / "config/config.yaml").read_text())["aws"]
    aws.update(prefix="bench", concurrency=1)
    stack = LocalAws.start(
        workdir / "handler-stack", slots=1, timeout_s=600, memory_mb=3538
    )
    with stack:
        use_stack(stack)
        stage_run(workdir / "parts", aws, MODEL, workdir / "staged.json")
        receipt = read_receipt(workdir / "staged.json")
        _, events = plan_events(receipt, [[0]], 1, MODEL, 512, "lambda")
        client = lambda_client(boto3.session.Session(), 600, 1)
        runs = []
        for _ in range(1 + WARM_REPEATS):
            record = dispatch(client, "cai-astromae", events, 1, RetryPolicy())[0]
            if record["status"] != "ok":
                raise SystemExit(f"invocation failed: {record['error']}")
            runs.append(record)
    cold, warm = runs[0], runs[1:]
    fields = [
        ("init (runtime start, imports)", lambda r: r["summary"]["init_s"]),
        ("model fetch from S3", lambda r: r["summary"]["model_fetch_s"]),
        ("model load", lambda r: r["summary"]["model_load_s"]),
        ("partition fetch from S3", lambda r: r["summary"]["fetch_s"]),
        (
            "compute (read + model)",
            lambda r: r["summary"]["read_s"] + r["summary"]["compute_s"],
        ),
        ("upload of results", lambda r: r["summary"]["upload_s"]),
        ("handler total", lambda r: r["summary"]["duration_ms"] / 1000),
        ("round trip at the dispatcher", lambda r: r["round_trip_ms"] / 1000),
    ]
    threads = cold["summary"]["threads"]
    print(
        f"\nreal handler, one {PARTITION_MB} MB partition ({rows} galaxies, batch 512, "
        f"3,538 MB = 2 Lambda vCPUs; {threads} torch thread(s): the slot is pinned to one "
        "core):"
    )
    print(f"{'seconds':32s} {'cold':>8s} {'warm (median of 3)':>20s}")
    for name, get in fields:
        warm_s = statistics.median(get(r) for r in warm)
        print(f"{name:32s} {get(cold):8.2f} {warm_s:20.2f}")
    cold_total = cold["round_trip_ms"]
    warm_total = statistics.median(r["round_trip_ms"] for r in warm)
    print(
        f"cold / warm round trip: {cold_total / warm_total:.2f}x; galaxies/s warm: "
        f"{rows / (warm_total / 1000):.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--invocations", type=int, default=2000)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--skip-handler", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cai-bench-aws-") as tmp:
        bench_dispatcher(Path(tmp), args.slots, args.invocations)
        if not args.skip_handler:
            bench_handler(Path(tmp))


if __name__ == "__main__":
    main()
