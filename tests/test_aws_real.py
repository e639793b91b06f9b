"""The AWS backend against real AWS: only what the local stack cannot show.

Opt-in: runs only with CAI_AWS_REAL=1 and real credentials in the environment (it costs
a few cents). Needs a deployed function (README, "AWS") named by CAI_AWS_FUNCTION
(default cai-astromae); the bucket is CAI_AWS_BUCKET or cai-<account>-<region>. With
CAI_AWS_SFN_ROLE (a role ARN for Step Functions) the Distributed Map path runs too,
with EXPRESS child workflows (which the local stack refuses).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cai.lambda_run import dispatch_run, stage_run
from cai.partition import partition_dataset
from cai.sky import simulate

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = yaml.safe_load((REPO / "config/config.yaml").read_text())
MODEL = {"checkpoint": None, "depth": 12, "num_heads": 8, "seed": 0}

pytestmark = [
    pytest.mark.aws_real,
    pytest.mark.skipif(
        os.environ.get("CAI_AWS_REAL") != "1",
        reason="real AWS: opt in with CAI_AWS_REAL=1 and credentials (costs cents)",
    ),
]


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    simulate(root / "galaxies.h5", 60, 7, 1)
    partition_dataset(root / "galaxies.h5", root / "parts", 0.5)
    aws = {**DEFAULTS["aws"], "prefix": "cai-test"}
    aws["function_name"] = os.environ.get("CAI_AWS_FUNCTION", "cai-astromae")
    aws["bucket"] = os.environ.get("CAI_AWS_BUCKET") or None
    stage_run(root / "parts", aws, MODEL, root / "staged.json")
    return root, aws


def dispatch(root: Path, aws: dict, name: str) -> dict:
    out = root / name
    return dispatch_run(
        root / "staged.json",
        [[0], [1], [2]],
        3,
        aws,
        MODEL,
        512,
        f"lambda-{name}",
        DEFAULTS["prices"],
        out / "results",
        out / "invocations.tsv",
        out / "dispatch.json",
        out / "failed.tsv",
        REPO / "lambda/statemachine.asl.json",
    )


def test_billing_figures_come_from_the_log_tail(staged):
    root, aws = staged
    summary = dispatch(root, aws, "boto3")
    records = pd.read_csv(root / "boto3/invocations.tsv", sep="\t")
    assert set(records["status"]) == {"ok"}
    assert set(records["report_source"]) == {"log"}
    assert (records["billed_ms"] >= records["duration_ms"]).all()
    assert (records["memory_mb"] == aws["memory_mb"]).all()
    assert (records.loc[records["cold"], "init_ms"] > 0).all()
    assert summary["cost_usd"]["total"] > 0


@pytest.mark.skipif(
    not os.environ.get("CAI_AWS_SFN_ROLE"), reason="needs CAI_AWS_SFN_ROLE"
)
def test_distributed_map_with_express_children(staged):
    root, aws = staged
    aws = json.loads(json.dumps(aws))
    aws["orchestrator"] = "stepfunctions"
    aws["stepfunctions"].update(
        role_arn=os.environ["CAI_AWS_SFN_ROLE"], execution_type="EXPRESS"
    )
    summary = dispatch(root, aws, "sfn")
    assert summary["invoked"] == 3
