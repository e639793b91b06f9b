"""The AWS backend against the local stack: moto's S3 / IAM / Step Functions and the
real handler in the Lambda Runtime Interface Emulator (through awslambdaric).

The stack is the project's own (`cai local-aws`, :mod:`cai.localaws`). Where it cannot
start (no RIE binary), the tests skip, except in CI (CI=true), where that is an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from test_workflow import check, snakemake

from cai.dispatch import InvocationError
from cai.lambda_run import dispatch_run, finished_invocations, plan_events, stage_run
from cai.partition import partition_dataset
from cai.sky import simulate
from cai.staging import StagingError, read_receipt
from cai.stepfunctions import map_run_counts

REPO = Path(__file__).resolve().parents[1]

DEFAULTS = yaml.safe_load((REPO / "config/config.yaml").read_text())
MODEL = {"checkpoint": None, "depth": 12, "num_heads": 8, "seed": 0}
LAMBDA_RUN = Path("results/lambda/dataset/0.5MB-b512/r1")
LOCAL_RUN = Path("results/local/dataset/0.5MB-b512/r1")

pytestmark = pytest.mark.aws


def start_stack(state_dir: Path, **kwargs):
    """A local AWS stack, or a skip (an error in CI) where it cannot start."""
    from cai.errors import CaiError
    from cai.localaws import LocalAws

    try:
        return LocalAws.start(state_dir, **kwargs)
    except CaiError as err:
        reason = f"local AWS stack did not start: {err}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@contextlib.contextmanager
def stack_env(stack):
    """The stack's endpoint, region and test credentials in os.environ."""
    with pytest.MonkeyPatch.context() as patch:
        for key in list(os.environ):
            if key.startswith("AWS_"):
                patch.delenv(key)
        for key, value in stack.env().items():
            patch.setenv(key, value)
        yield


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Two Lambda slots running lambda/handler.py, for the module's tests."""
    running = start_stack(
        tmp_path_factory.mktemp("aws-stack"), slots=2, timeout_s=300, memory_mb=3008
    )
    with running, stack_env(running):
        yield running


@pytest.fixture(scope="module")
def partitions(tmp_path_factory):
    """Three partitions (25, 25, 10 galaxies) and their manifest."""
    root = tmp_path_factory.mktemp("parts")
    simulate(root / "galaxies.h5", 60, 7, 1)
    partition_dataset(root / "galaxies.h5", root / "parts", 0.5)
    return root / "parts"


def aws_config(**overrides) -> dict:
    aws = json.loads(json.dumps(DEFAULTS["aws"]))
    aws.update(memory_mb=3008, timeout_s=300, concurrency=2, backoff_cap_s=2)
    aws.update(overrides)
    return aws


def run_dispatch(tmp: Path, receipt: Path, aws: dict, jobs=((0,), (1,), (2,))):
    return dispatch_run(
        receipt,
        [list(j) for j in jobs],
        3,
        aws,
        MODEL,
        512,
        "lambda",
        DEFAULTS["prices"],
        tmp / "results",
        tmp / "invocations.tsv",
        tmp / "dispatch.json",
        tmp / "failed.tsv",
        REPO / "lambda/statemachine.asl.json",
    )


def test_workflow_through_profile_matches_local_backend(stack, tmp_path):
    env = {**os.environ, **stack.env()}
    check(snakemake(tmp_path))  # the local backend, for reference
    # The profile's own configfile line is replaced by ours: list both.
    backend = REPO / "profiles/aws/backend.yaml"
    aws = ["--profile", str(REPO / "profiles/aws")]
    aws += ["--configfile", str(backend), str(tmp_path / "tiny.yaml")]
    account = boto3.client("sts").get_caller_identity()["Account"]
    config = {
        "aws": {
            "concurrency": 2,
            "memory_mb": 3008,
            "deploy": True,  # the deploy rule against the stack's Lambda API
            "image_uri": f"{account}.dkr.ecr.us-east-1.amazonaws.com/cai:test",
            "role_arn": stack.create_role("cai-lambda"),
        }
    }
    result = check(run_with_env(tmp_path, env, *aws, config=config))
    assert "rule deploy" in result.stderr and "rule dispatch" in result.stderr
    deployed = json.loads(
        (tmp_path / "results/lambda/deploy/cai-astromae.json").read_text()
    )
    assert (
        deployed["action"] == "created"
        and deployed["changes"]["memory_mb"]["new"] == 3008
    )

    local = pq.read_table(tmp_path / LOCAL_RUN / "catalogue.parquet").to_pandas()
    remote = pq.read_table(tmp_path / LAMBDA_RUN / "catalogue.parquet").to_pandas()
    assert remote["object_id"].tolist() == local["object_id"].tolist()
    np.testing.assert_allclose(remote["z_pred"], local["z_pred"], rtol=0, atol=1e-6)

    records = pd.read_csv(tmp_path / LAMBDA_RUN / "lambda/invocations.tsv", sep="\t")
    assert len(records) == 3 and set(records["status"]) == {"ok"}
    for column in ("request_id", "started_at", "ended_at", "duration_ms", "billed_ms"):
        assert records[column].notna().all(), column
    assert (records["billed_ms"] >= records["duration_ms"]).all()
    assert (records["memory_mb"] == 3008).all()
    assert (records["max_memory_mb"] > 100).all()
    assert 1 <= records["cold"].sum() <= 2  # one cold start per slot used
    assert (records.loc[records["cold"], "model_fetch_s"] > 0).all()
    summary = json.loads((tmp_path / LAMBDA_RUN / "lambda/dispatch.json").read_text())
    assert summary["invoked"] == 3 and summary["skipped"] == 0
    assert summary["cost_usd"]["lambda"]["requests"] == 3
    assert summary["cost_usd"]["total"] > 0
    run_summary = json.loads((tmp_path / LAMBDA_RUN / "summary.json").read_text())
    assert run_summary["backend"] == "lambda" and run_summary["partitions"] == 3

    # A rerun after the local results are lost invokes nothing: S3 holds them.
    shutil.rmtree(tmp_path / LAMBDA_RUN)
    check(run_with_env(tmp_path, env, *aws, config=config))
    summary = json.loads((tmp_path / LAMBDA_RUN / "lambda/dispatch.json").read_text())
    assert summary["invoked"] == 0 and summary["skipped"] == 3
    again = pq.read_table(tmp_path / LAMBDA_RUN / "catalogue.parquet").to_pandas()
    np.testing.assert_array_equal(again["z_pred"], remote["z_pred"])


def run_with_env(workdir: Path, env: dict, *args: str, config: dict | None = None):
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        return snakemake(workdir, *args, config=config)


def test_throttled_invocations_are_retried_and_succeed(stack, partitions, tmp_path):
    receipt = tmp_path / "staged.json"
    stage_run(partitions, aws_config(), MODEL, receipt)
    # Four in flight against two slots: the stack answers 429 like Lambda does when
    # the concurrency is exhausted.
    summary = run_dispatch(tmp_path, receipt, aws_config(concurrency=4, prefix="thr"))
    records = pd.read_csv(tmp_path / "invocations.tsv", sep="\t")
    assert set(records["status"]) == {"ok"}
    assert summary["throttled_attempts"] > 0
    assert records["throttles"].sum() == summary["throttled_attempts"]
    assert (records["attempts"] == records["throttles"] + 1).all()


def test_stage_skips_objects_already_there(stack, partitions, tmp_path):
    first = stage_run(partitions, aws_config(prefix="skip"), MODEL, tmp_path / "a.json")
    second = stage_run(
        partitions, aws_config(prefix="skip"), MODEL, tmp_path / "b.json"
    )
    assert first["uploaded"] == 4 and first["skipped"] == 0  # 3 partitions + model
    assert second["uploaded"] == 0 and second["skipped"] == 4


def test_corrupt_object_is_named_and_nothing_is_fetched(stack, partitions, tmp_path):
    receipt_path = tmp_path / "staged.json"
    aws = aws_config(prefix="corrupt")
    stage_run(partitions, aws, MODEL, receipt_path)
    receipt = read_receipt(receipt_path)
    s3 = boto3.client("s3")
    key = receipt["partitions"][1]["key"]
    s3.put_object(Bucket=receipt["bucket"], Key=key, Body=b"not an HDF5 file")
    with pytest.raises(InvocationError) as err:
        run_dispatch(tmp_path, receipt_path, aws)
    message = str(err.value)
    assert "1 of 3 invocations failed" in message
    assert "part-00001" in message and "ChecksumError" in message and key in message
    assert not (tmp_path / "results").exists()  # nothing to aggregate from
    assert not (tmp_path / "invocations.tsv").exists()
    failed = pd.read_csv(tmp_path / "failed.tsv", sep="\t")
    row = failed.set_index("invocation").loc[1]
    assert row["status"] == "failed" and row["attempts"] == 1  # a data error: no retry
    run_prefix, _ = plan_events(receipt, [[0], [1], [2]], 3, MODEL, 512, "lambda")
    assert finished_invocations(s3, receipt["bucket"], run_prefix) == {0, 2}


def test_missing_staged_manifest_says_stage_again(stack, partitions, tmp_path):
    receipt_path = tmp_path / "staged.json"
    stage_run(partitions, aws_config(prefix="gone"), MODEL, receipt_path)
    receipt = read_receipt(receipt_path)
    boto3.client("s3").delete_object(
        Bucket=receipt["bucket"], Key=receipt["manifest_key"]
    )
    with pytest.raises(StagingError, match="stage again"):
        run_dispatch(tmp_path, receipt_path, aws_config(prefix="gone"))


def test_crash_on_one_partition_is_retried_then_reported(partitions, tmp_path):
    faulty = start_stack(
        tmp_path / "stack",
        slots=2,
        handler="crash.handler",
        handler_dir=REPO / "tests/lambda_faults",
        timeout_s=300,
        memory_mb=3008,
        env={"CAI_TEST_CRASH_PARTITION": "part-00001"},
    )
    with faulty, stack_env(faulty):
        receipt = tmp_path / "staged.json"
        stage_run(partitions, aws_config(), MODEL, receipt)
        with pytest.raises(InvocationError) as err:
            run_dispatch(tmp_path, receipt, aws_config(max_attempts=3))
        assert (
            "invocation 1 (part-00001): function RuntimeError after 3 attempts"
            in str(err.value)
        )
        failed = pd.read_csv(tmp_path / "failed.tsv", sep="\t").set_index("invocation")
        assert failed.loc[1, "retries"] == 2
        assert list(failed.loc[[0, 2], "status"]) == ["ok", "ok"]

        # Step Functions: the same crash is one failed item of the map run.
        aws = step_functions_config(faulty, "sfn-crash")
        stage_run(partitions, aws, MODEL, receipt)
        with pytest.raises(InvocationError, match="invocation 1 \\(part-00001\\)"):
            run_dispatch(tmp_path, receipt, aws)
        counts = last_map_run_counts()
        assert (counts["total"], counts["succeeded"], counts["failed"]) == (3, 2, 1)


def test_invocation_past_its_timeout_is_reported(partitions, tmp_path):
    # One second is less than the handler's cold start (Python, torch): every
    # attempt times out.
    short = start_stack(tmp_path / "stack", slots=1, timeout_s=1, memory_mb=3008)
    with short, stack_env(short):
        receipt = tmp_path / "staged.json"
        stage_run(partitions, aws_config(), MODEL, receipt)
        with pytest.raises(InvocationError) as err:
            run_dispatch(
                tmp_path,
                receipt,
                aws_config(concurrency=1, max_attempts=2, timeout_s=1),
                jobs=[(0, 1, 2)],
            )
        assert "timeout Sandbox.Timedout after 2 attempts" in str(err.value)
        assert "Task timed out after 1.00 seconds" in str(err.value)


def step_functions_config(stack, prefix: str) -> dict:
    aws = aws_config(orchestrator="stepfunctions", prefix=prefix)
    aws["stepfunctions"] = {
        **aws["stepfunctions"],
        "role_arn": stack.create_role("cai-sfn"),
        "max_concurrency": 2,
        "poll_s": 0.5,
        "max_wait_s": 300,
    }
    return aws


def last_map_run_counts() -> dict:
    """Item counts of the map run of the newest execution of the state machine."""
    sfn = boto3.client("stepfunctions")
    machines = sfn.list_state_machines()["stateMachines"]
    assert [m["name"] for m in machines] == ["cai-astromae"]
    executions = sfn.list_executions(stateMachineArn=machines[0]["stateMachineArn"])
    newest = max(executions["executions"], key=lambda e: e["startDate"])
    return map_run_counts(sfn, newest["executionArn"])


def test_step_functions_distributed_map(stack, partitions, tmp_path):
    aws = step_functions_config(stack, "sfn")
    receipt = tmp_path / "staged.json"
    stage_run(partitions, aws, MODEL, receipt)
    summary = run_dispatch(tmp_path, receipt, aws)
    assert summary["orchestrator"] == "stepfunctions"
    assert summary["invoked"] == 3
    assert summary["cost_usd"]["stepfunctions"]["total_usd"] > 0
    records = pd.read_csv(tmp_path / "invocations.tsv", sep="\t")
    assert set(records["status"]) == {"ok"} and records["request_id"].notna().all()
    assert len(sorted((tmp_path / "results").glob("job-*.parquet"))) == 3
    counts = last_map_run_counts()
    assert (counts["total"], counts["succeeded"], counts["failed"]) == (3, 3, 0)


def test_deploy_command_is_idempotent(stack, tmp_path):
    from cai.cli import main

    account = boto3.client("sts").get_caller_identity()["Account"]
    args = [
        "aws-deploy",
        "--function-name",
        "cai-deploy-test",
        "--image-uri",
        f"{account}.dkr.ecr.us-east-1.amazonaws.com/cai:1",
        "--role-arn",
        stack.create_role("cai-lambda"),
        "--memory-mb",
        "2048",
        "--receipt",
        str(tmp_path / "receipt.json"),
    ]
    assert main(args) == 0
    assert json.loads((tmp_path / "receipt.json").read_text())["action"] == "created"
    assert main(args) == 0
    assert json.loads((tmp_path / "receipt.json").read_text())["action"] == "unchanged"
    args[args.index("2048")] = "4096"
    assert main(args) == 0
    receipt = json.loads((tmp_path / "receipt.json").read_text())
    assert receipt["action"] == "updated"
    assert receipt["changes"] == {"memory_mb": {"old": 2048, "new": 4096}}
