"""The ``cai`` command: every step of the workflow, runnable on its own.

Each subcommand is what one Snakemake rule runs; ``cai <command> --help`` documents it.
Errors caused by input (a bad file, key or value) print one line naming it and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cai import __version__
from cai.errors import CaiError

_logger = logging.getLogger("cai")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


# `cai finetune` options: FinetuneSettings fields of the same name, their defaults
# (tests/test_cli.py checks they are FinetuneSettings' own; importing it here would
# import torch for every `cai --help`) and help.
FINETUNE_OPTIONS = {
    "max_epochs": (20, "most passes over the training split"),
    "patience": (10, "epochs without a better validation NMAD before stopping"),
    "batch_size": (64, "galaxies per optimiser step"),
    "learning_rate": (1e-3, "peak learning rate of AdamW"),
    "weight_decay": (0.05, "AdamW weight decay of matrices and kernels"),
    "warmup_epochs": (1.0, "epochs of linear warm-up"),
    "final_lr_fraction": (0.01, "the cosine decay ends at this fraction of the peak"),
    "average_decay": (0.99, "decay of the kept weight average per step (0: none)"),
    "min_validation": (100, "fewest validation galaxies accepted"),
    "threads": (2, "torch threads"),
}


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--checkpoint",
        help="safetensors or state_dict file (default: untrained seeded weights)",
    )
    group.add_argument(
        "--depth", type=_positive_int, default=12, help="encoder blocks (default 12)"
    )
    group.add_argument(
        "--num-heads", type=_positive_int, default=8, help="attention heads (default 8)"
    )
    group.add_argument(
        "--seed", type=int, default=0, help="seed of untrained weights (default 0)"
    )


def cmd_simulate(args: argparse.Namespace) -> None:
    from cai.sky import simulate

    simulate(args.out, args.n, args.seed, args.first_object_id)


def cmd_import_pt(args: argparse.Namespace) -> None:
    from cai.importpt import import_pt

    import_pt(args.files, args.out, args.first_object_id)


def cmd_partition(args: argparse.Namespace) -> None:
    from cai.partition import partition_dataset

    try:
        partition_dataset(args.source, args.out_dir, args.size_mb)
    except ValueError as err:
        raise CaiError(f"--size-mb {args.size_mb}: {err}") from None


def cmd_infer(args: argparse.Namespace) -> None:
    from cai.engine import InferenceSettings, PartitionRef, run_inference
    from cai.model import ModelConfig
    from cai.partition import read_manifest

    manifest = read_manifest(args.manifest)
    entries = {p["id"]: p for p in manifest["partitions"]}
    wanted = args.partitions or list(entries)
    unknown = [p for p in wanted if p not in entries]
    if unknown:
        raise CaiError(
            f"--partitions: {', '.join(unknown)} not in {args.manifest} "
            f"(it lists {len(entries)} partitions, {next(iter(entries), 'none')}...)"
        )
    settings = InferenceSettings(
        batch_size=args.batch_size,
        device=args.device,
        threads=args.threads,
        backend=args.backend,
        verify_checksum=not args.no_verify,
        precision=args.precision,
    )
    run_inference(
        [PartitionRef.from_manifest(entries[p]) for p in wanted],
        args.predictions,
        args.metrics,
        settings,
        ModelConfig(depth=args.depth, num_heads=args.num_heads),
        args.checkpoint,
        args.seed,
    )


def cmd_aggregate(args: argparse.Namespace) -> None:
    from cai.aggregate import aggregate

    aggregate(
        args.predictions,
        args.metrics,
        args.manifest,
        args.catalogue,
        args.partition_table,
        args.summary,
        args.logical_partitions,
    )


def cmd_metrics(args: argparse.Namespace) -> None:
    from cai.aggregate import predictions_label, read_summary
    from cai.metrics import write_accuracy_table

    weights = args.weights or predictions_label(read_summary(args.summary))
    table = write_accuracy_table(
        args.catalogue, args.out, weights, args.split, args.baseline
    )
    print(table.to_string(index=False))


def cmd_split(args: argparse.Namespace) -> None:
    from cai.split import write_split

    write_split(
        args.files,
        args.out,
        args.seed,
        {"train": args.train, "validation": args.validation, "test": args.test},
        args.min_validation,
    )


def cmd_finetune(args: argparse.Namespace) -> None:
    from cai.finetune import FinetuneSettings, finetune
    from cai.model import ModelConfig

    settings = FinetuneSettings(
        **{field: getattr(args, field) for field in FINETUNE_OPTIONS},
        seed=args.training_seed,
        augment=not args.no_augment,
        recentre=not args.no_recentre,
        device=args.device,
    )
    finetune(
        args.files,
        args.split,
        args.out,
        args.record or str(args.out).removesuffix(".safetensors") + ".json",
        settings,
        ModelConfig(depth=args.depth, num_heads=args.num_heads),
        args.checkpoint,
        args.seed,
        args.work_dir,
    )


def cmd_baseline_knn(args: argparse.Namespace) -> None:
    from cai.baseline import knn_baseline

    knn_baseline(args.files, args.split, args.out)


def cmd_convert(args: argparse.Namespace) -> None:
    from cai.convert import convert_checkpoint

    convert_checkpoint(args.source, args.out, args.trust_pickle, args.num_heads)


def cmd_precision_gate(args: argparse.Namespace) -> None:
    from cai.model import ModelConfig
    from cai.precision import GateLimits, run_gate

    rows = run_gate(
        args.manifest,
        args.precisions,
        args.max_galaxies,
        args.batch_size,
        args.threads,
        GateLimits(args.max_nmad_change, args.max_abs_dz),
        args.out,
        ModelConfig(depth=args.depth, num_heads=args.num_heads),
        args.checkpoint,
        args.seed,
    )
    for row in rows:
        verdict = "passes" if row["passes"] else f"FAILS: {row['reason']}"
        print(
            f"{row['precision']:5s} {row['speedup_vs_fp32']:5.2f}x fp32, max |dz_pred| "
            f"{row['max_abs_dz_pred']:.2e}, NMAD {100 * row['nmad_change_frac']:+.2f}%: "
            f"{verdict}"
        )


def cmd_aws_deploy(args: argparse.Namespace) -> None:
    from cai.lambda_run import deploy_from_config

    aws = {
        "region": args.region,
        "function_name": args.function_name,
        "image_uri": args.image_uri,
        "role_arn": args.role_arn,
        "memory_mb": args.memory_mb,
        "timeout_s": args.timeout_s,
        "ephemeral_mb": args.ephemeral_mb,
        "architecture": args.architecture,
    }
    result = deploy_from_config(aws, args.receipt)
    changes = ", ".join(
        f"{field} {change['old']} -> {change['new']}"
        for field, change in result["changes"].items()
    )
    print(
        f"{result['name']}: {result['action']}" + (f" ({changes})" if changes else "")
    )


def cmd_plan(args: argparse.Namespace) -> None:
    import yaml

    from cai.cost import PRICES_KEY, Prices
    from cai.errors import ConfigError
    from cai.experiment import read_runs
    from cai.planner import (
        BUDGET_KEYS,
        PLANNER_KEY,
        REQUIRED_COLUMNS,
        Assumptions,
        calibrate,
        describe_recommendation,
        format_table,
        plan_table,
        recommendations,
        write_table,
    )

    # Several files merge as Snakemake merges config files: later ones win, key by key.
    config: dict = {}
    for path in args.config:
        try:
            with open(path) as fh:
                loaded = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise ConfigError(f"--config {path}: file not found") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {path}: not valid YAML ({err})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: expected a mapping of sections")
        for section, value in loaded.items():
            if isinstance(value, dict) and isinstance(config.get(section), dict):
                config[section] = {**config[section], **value}
            else:
                config[section] = value
    if PRICES_KEY not in config:
        raise ConfigError(
            f"--config {' '.join(args.config)}: has no {PRICES_KEY!r} section"
        )
    planner = dict(config.get(PLANNER_KEY) or {})
    budgets = {key: planner.pop(key, None) for key in BUDGET_KEYS}
    assumptions = Assumptions.from_config(planner)
    prices = Prices.from_config(config[PRICES_KEY])
    cal = calibrate(read_runs(args.runs, REQUIRED_COLUMNS), assumptions, args.precision)
    data_gbs = args.data_gb or list(assumptions.data_gb)
    table = plan_table(cal, assumptions, prices, data_gbs)
    if args.out:
        write_table(table, args.out)
    print(format_table(table))
    if args.time_budget_s is None and args.cost_budget_usd is None:
        time_budget, cost_budget = budgets["time_budget_s"], budgets["cost_budget_usd"]
    else:
        time_budget, cost_budget = args.time_budget_s, args.cost_budget_usd
    best = recommendations(table, data_gbs, time_budget, cost_budget)
    for _, row in best.iterrows():
        print(describe_recommendation(row))


def cmd_local_aws(args: argparse.Namespace) -> int:
    from cai.localaws import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cai",
        description="Cloud-based Astronomy Inference: AstroMAE redshifts for galaxy images.",
    )
    parser.add_argument("--version", action="version", version=f"cai {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("simulate", help="make a synthetic SDSS-like galaxy file")
    p.add_argument(
        "--n", type=_positive_int, required=True, help="galaxies to simulate"
    )
    p.add_argument("--seed", type=int, default=42, help="seed (default 42)")
    p.add_argument(
        "--first-object-id", type=int, default=1, help="first object_id (default 1)"
    )
    p.add_argument("--out", required=True, help="output HDF5 galaxy file")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("import-pt", help="import the paper's TensorDataset .pt files")
    p.add_argument("files", nargs="+", help=".pt files, in row order")
    p.add_argument(
        "--first-object-id", type=int, default=1, help="first object_id (default 1)"
    )
    p.add_argument("--out", required=True, help="output HDF5 galaxy file")
    p.set_defaults(func=cmd_import_pt)

    p = sub.add_parser(
        "partition", help="split a galaxy file into partitions + manifest"
    )
    p.add_argument("source", help="HDF5 galaxy file")
    p.add_argument("--size-mb", type=float, required=True, help="partition size in MiB")
    p.add_argument(
        "--out-dir",
        required=True,
        help="new folder for part-NNNNN.h5 and manifest.json",
    )
    p.set_defaults(func=cmd_partition)

    p = sub.add_parser("infer", help="predict redshifts for partitions of a manifest")
    p.add_argument(
        "--manifest", required=True, help="manifest.json from 'cai partition'"
    )
    p.add_argument("--partitions", nargs="+", help="partition ids (default: all)")
    p.add_argument("--predictions", required=True, help="output Parquet of predictions")
    p.add_argument("--metrics", required=True, help="output JSON of timing records")
    p.add_argument("--batch-size", type=_positive_int, default=512, help="default 512")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=_positive_int, default=1, help="torch threads")
    p.add_argument("--backend", default="local", help="label kept in every record")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "int8"],
        default="fp32",
        help="model arithmetic (default fp32; see `cai precision-gate`)",
    )
    _add_model_args(p)
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("aggregate", help="join inference outputs into a catalogue")
    p.add_argument("--manifest", required=True)
    p.add_argument("--predictions", nargs="+", required=True, help="Parquet files")
    p.add_argument(
        "--metrics", nargs="+", required=True, help="metrics JSON files, same order"
    )
    p.add_argument("--catalogue", required=True, help="output Parquet catalogue")
    p.add_argument(
        "--partition-table", required=True, help="output TSV, one row a partition"
    )
    p.add_argument("--summary", required=True, help="output JSON run summary")
    p.add_argument(
        "--logical-partitions",
        type=_positive_int,
        help="partitions of the plan when it reuses the manifest's files cyclically",
    )
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser("metrics", help="accuracy of a catalogue with true redshifts")
    p.add_argument("catalogue", help="Parquet with z_pred and z_true")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--summary", help="run summary JSON that names the weights")
    source.add_argument("--weights", help="what made the predictions, for the table")
    p.add_argument("--out", required=True, help="output TSV (also printed)")
    p.set_defaults(func=cmd_metrics)

    p.add_argument("--split", help="split table: count its test galaxies only")
    p.add_argument(
        "--baseline", help="kNN baseline table (cai baseline-knn) to compare"
    )

    p = sub.add_parser(
        "split",
        help="split labelled galaxies into train, validation and test",
        description="Ranks a seeded hash of each object_id and cuts it at the "
        "fractions: deterministic, disjoint, exact in counts, independent of row "
        "order. Refuses unlabelled galaxies (NaN redshift) and a validation split "
        "smaller than --min-validation.",
    )
    p.add_argument("files", nargs="+", help="CAI galaxy files (data set or partitions)")
    p.add_argument("--out", required=True, help="output Parquet split table")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--train", type=float, default=0.7, help="fraction (default 0.7)")
    p.add_argument("--validation", type=float, default=0.1, help="default 0.1")
    p.add_argument("--test", type=float, default=0.2, help="default 0.2")
    p.add_argument("--min-validation", type=_positive_int, default=100)
    p.set_defaults(func=cmd_split)

    p = sub.add_parser(
        "finetune",
        help="train AstroMAE's head on labelled galaxies, the encoder frozen",
        description="The paper's fine-tuning: the encoder frozen (from --checkpoint, "
        "or seeded untrained weights), the ViT head, Inception branch, magnitude "
        "block and regression head trained with MSE loss and AdamW, stopped early on "
        "the validation NMAD. The encoder runs once per galaxy (cached in the work "
        "folder); a killed run resumes after its last finished epoch.",
    )
    p.add_argument("files", nargs="+", help="labelled CAI galaxy files")
    p.add_argument("--split", required=True, help="split table from 'cai split'")
    p.add_argument("--out", required=True, help="output .safetensors checkpoint")
    p.add_argument("--record", help="training record JSON (default: beside --out)")
    p.add_argument("--work-dir", help="cache and state folder (default: <out>.work)")
    for field, (default, text) in FINETUNE_OPTIONS.items():
        p.add_argument(
            "--" + field.replace("_", "-"),
            type=type(default),
            default=default,
            help=f"{text} (default {default:g})",
        )
    p.add_argument(
        "--training-seed",
        type=int,
        default=0,
        help="seed of the training order and augmentation (default 0)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--no-augment", action="store_true", help="no random turns and mirror images"
    )
    p.add_argument(
        "--no-recentre",
        action="store_true",
        help="keep the median validation residual (no shift of the predictions)",
    )
    _add_model_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "baseline-knn",
        help="the colours-only kNN redshift yardstick on a split",
        description="Mean redshift of the k nearest training galaxies in "
        "(u-g, g-r, r-i, i-z, r), k chosen on the validation split; predicts the test "
        "split.",
    )
    p.add_argument("files", nargs="+", help="labelled CAI galaxy files")
    p.add_argument("--split", required=True, help="split table from 'cai split'")
    p.add_argument("--out", required=True, help="output Parquet of test predictions")
    p.set_defaults(func=cmd_baseline_knn)

    p = sub.add_parser(
        "convert-checkpoint",
        help="convert the original pickled AstroMAE model to safetensors",
        description="Unpickling runs code stored in the file: give --trust-pickle only "
        "for a file whose origin you trust. Even then only the original model's "
        "classes and torch's own are resolved.",
    )
    p.add_argument("source", help="the original torch.save(model) file")
    p.add_argument("out", help="output .safetensors")
    p.add_argument(
        "--trust-pickle", action="store_true", help="I trust this file's origin"
    )
    p.add_argument(
        "--num-heads", type=_positive_int, default=8, help="heads (default 8)"
    )
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "precision-gate",
        help="what bf16 and int8 change against fp32 on labelled galaxies",
    )
    p.add_argument("--manifest", required=True, help="manifest.json (labelled data)")
    p.add_argument(
        "--precisions", nargs="+", default=["fp32", "bf16", "int8"], metavar="P"
    )
    p.add_argument("--max-galaxies", type=_positive_int, default=512)
    p.add_argument("--batch-size", type=_positive_int, default=512)
    p.add_argument("--threads", type=_positive_int, default=1, help="torch threads")
    p.add_argument("--max-nmad-change", type=float, default=0.01, help="fraction")
    p.add_argument("--max-abs-dz", type=float, default=1e-3)
    p.add_argument("--out", required=True, help="output TSV")
    _add_model_args(p)
    p.set_defaults(func=cmd_precision_gate)

    p = sub.add_parser(
        "aws-deploy",
        help="create or update the Lambda function from a container image",
        description="Idempotent: creates the function, or updates what differs from "
        "the given settings, and prints what changed. Needs lambda:GetFunction, "
        "lambda:CreateFunction, lambda:UpdateFunctionConfiguration, "
        "lambda:UpdateFunctionCode and iam:PassRole.",
    )
    p.add_argument("--function-name", default="cai-astromae")
    p.add_argument("--image-uri", required=True, help="ECR image (lambda/Dockerfile)")
    p.add_argument("--role-arn", required=True, help="the function's execution role")
    p.add_argument("--memory-mb", type=int, default=10240, help="128..10240")
    p.add_argument("--timeout-s", type=int, default=900, help="1..900")
    p.add_argument("--ephemeral-mb", type=int, default=2048, help="/tmp, 512..10240")
    p.add_argument("--architecture", choices=["x86_64", "arm64"], default="x86_64")
    p.add_argument("--region", help="default: boto3's (AWS_REGION, ~/.aws/config)")
    p.add_argument(
        "--receipt", default="results/lambda/deploy/receipt.json", help="output JSON"
    )
    p.set_defaults(func=cmd_aws_deploy)

    p = sub.add_parser(
        "plan",
        help="predict time and cost of data sizes per backend from measured runs",
        description="Fits a time model to the measured runs (the experiment's runs "
        "table), predicts every backend x partition size x Lambda memory for each "
        "data size, and recommends the cheapest option within --time-budget-s, the "
        "fastest within --cost-budget-usd (default: planner.time_budget_s or "
        "planner.cost_budget_usd of --config), or the cheapest overall. Reads the "
        "'planner' and 'prices' sections of --config.",
    )
    p.add_argument("--runs", required=True, help="runs table (CSV, TSV or Parquet)")
    p.add_argument(
        "--data-gb",
        type=float,
        nargs="+",
        metavar="X",
        help="data sizes to plan, GiB (default: planner.data_gb of --config)",
    )
    p.add_argument(
        "--config",
        nargs="+",
        default=["config/config.yaml"],
        help="config files with planner: and prices:, later ones merged over earlier "
        "(default config/config.yaml; e.g. config/config.yaml "
        "config/experiments/paper.yaml)",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--time-budget-s", type=float, help="cheapest option finishing within S s"
    )
    budget.add_argument(
        "--cost-budget-usd", type=float, help="fastest option costing at most C USD"
    )
    p.add_argument(
        "--precision", help="plan from runs of this precision (when runs mix them)"
    )
    p.add_argument("--out", help="output TSV of every option")
    p.set_defaults(func=cmd_plan)

    from cai.localaws import build_parser as local_aws_parser

    p = sub.add_parser(
        "local-aws",
        help="start, stop or show the local AWS stack (S3, Step Functions, Lambda RIE)",
        description="A local stand-in for AWS on 127.0.0.1: moto's S3, IAM and Step "
        "Functions, and the real handler in a pool of Lambda Runtime Interface "
        'Emulators, behind one endpoint. `eval "$(cai local-aws env)"` points '
        "boto3, the AWS CLI and `snakemake --profile profiles/aws` at it.",
    )
    local_aws_parser(p)
    p.set_defaults(func=cmd_local_aws)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cai.logs import setup_logging

    setup_logging(level=logging.DEBUG if args.verbose else logging.INFO)
    try:
        status = args.func(args)
    except CaiError as err:
        print(f"cai {args.command}: error: {err}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
