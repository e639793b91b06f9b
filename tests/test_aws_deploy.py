"""Deploying the Lambda function against a real (local) moto server.

moto accepts image functions without Docker: it does not pull the image (unless
MOTO_LAMBDA_STUB_ECR=false, then the image must be in its mocked ECR). It reports a
function Active and an update Successful at once, so the waiters return on their first
reading. It ignores EphemeralStorage in UpdateFunctionConfiguration and Architectures
in UpdateFunctionCode; those tests check the calls made rather than the stored state.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from cai.aws_deploy import DeployResult, FunctionSpec, deploy_function
from cai.errors import CaiError, ConfigError

REGION = "us-east-1"
LAMBDA_TRUST_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Principal": {"Service": "lambda.amazonaws.com"},
            "Action": "sts:AssumeRole",
        }
    ],
}
MUTATING = {"CreateFunction", "UpdateFunctionCode", "UpdateFunctionConfiguration"}


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Fresh moto state: clients, the account, an execution role and an image URI."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    reset = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    with urllib.request.urlopen(reset):
        pass

    def client(service: str) -> Any:
        return boto3.client(service, region_name=REGION, endpoint_url=endpoint)

    account = client("sts").get_caller_identity()["Account"]
    role = client("iam").create_role(
        RoleName="cai-lambda",
        AssumeRolePolicyDocument=json.dumps(LAMBDA_TRUST_POLICY),
    )["Role"]
    lam = client("lambda")
    calls: list[str] = []
    lam.meta.events.register(
        "before-call.lambda", lambda model, **_: calls.append(model.name)
    )
    return {
        "client": client,
        "lambda": lam,
        "calls": calls,
        "account": account,
        "role_arn": role["Arn"],
        "image": f"{account}.dkr.ecr.{REGION}.amazonaws.com/cai-astromae:test",
    }


def make_spec(aws: dict[str, Any], **overrides: Any) -> FunctionSpec:
    fields: dict[str, Any] = {
        "name": "cai-infer",
        "image_uri": aws["image"],
        "role_arn": aws["role_arn"],
        "memory_mb": 3008,
        "timeout_s": 300,
        "ephemeral_mb": 512,
        "architecture": "x86_64",
        "environment": {"CAI_BUCKET": "cai-test"},
        "description": "CAI inference",
    }
    fields.update(overrides)
    return FunctionSpec(**fields)


def test_create_then_unchanged(
    aws: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    spec = make_spec(aws)
    with caplog.at_level(logging.INFO, logger="cai.aws_deploy"):
        created = deploy_function(aws["lambda"], spec, poll_s=0.1)
    assert created.action == "created"
    assert created.changes["memory_mb"] == (None, 3008)
    assert created.function_arn.endswith(":function:cai-infer")
    assert "CreateFunction" in aws["calls"]
    assert "deploy cai-infer: created (" in caplog.text

    live = aws["lambda"].get_function(FunctionName="cai-infer")
    configuration = live["Configuration"]
    assert configuration["PackageType"] == "Image"
    assert live["Code"]["ImageUri"] == aws["image"]
    assert configuration["MemorySize"] == 3008
    assert configuration["Timeout"] == 300
    assert configuration["EphemeralStorage"]["Size"] == 512
    assert configuration["Architectures"] == ["x86_64"]
    assert configuration["Environment"]["Variables"] == {"CAI_BUCKET": "cai-test"}
    assert configuration["Role"] == aws["role_arn"]

    aws["calls"].clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cai.aws_deploy"):
        again = deploy_function(aws["lambda"], spec)
    assert again.action == "unchanged"
    assert again.changes == {}
    assert again.function_arn == created.function_arn
    assert not MUTATING & set(aws["calls"]), aws["calls"]
    assert "deploy cai-infer: unchanged in" in caplog.text


def test_configuration_change_updates_exactly_those_fields(
    aws: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    spec = make_spec(aws)
    deploy_function(aws["lambda"], spec)
    changed = replace(
        spec,
        memory_mb=10240,
        timeout_s=900,
        environment={"CAI_BUCKET": "cai-test", "CAI_LOG": "debug"},
    )
    aws["calls"].clear()
    with caplog.at_level(logging.INFO, logger="cai.aws_deploy"):
        result = deploy_function(aws["lambda"], changed)
    assert result.action == "updated"
    assert result.changes == {
        "memory_mb": (3008, 10240),
        "timeout_s": (300, 900),
        "environment": (
            {"CAI_BUCKET": "cai-test"},
            {"CAI_BUCKET": "cai-test", "CAI_LOG": "debug"},
        ),
    }
    assert "UpdateFunctionConfiguration" in aws["calls"]
    assert "UpdateFunctionCode" not in aws["calls"]
    assert "memory_mb 3008 -> 10240" in caplog.text
    assert "environment +CAI_LOG" in caplog.text
    assert "debug" not in caplog.text  # values are not logged

    configuration = aws["lambda"].get_function(FunctionName="cai-infer")[
        "Configuration"
    ]
    assert configuration["MemorySize"] == 10240
    assert configuration["Timeout"] == 900
    assert configuration["Environment"]["Variables"]["CAI_LOG"] == "debug"
    assert deploy_function(aws["lambda"], changed).action == "unchanged"


def test_image_change_updates_code(aws: dict[str, Any]) -> None:
    spec = make_spec(aws)
    deploy_function(aws["lambda"], spec)
    new_image = aws["image"].replace(":test", ":v2")
    aws["calls"].clear()
    result = deploy_function(aws["lambda"], replace(spec, image_uri=new_image))
    assert result.action == "updated"
    assert result.changes == {"image_uri": (aws["image"], new_image)}
    assert "UpdateFunctionCode" in aws["calls"]
    assert "UpdateFunctionConfiguration" not in aws["calls"]
    live = aws["lambda"].get_function(FunctionName="cai-infer")
    assert live["Code"]["ImageUri"] == new_image
    assert deploy_function(
        aws["lambda"], replace(spec, image_uri=new_image)
    ).action == ("unchanged")


def test_architecture_and_ephemeral_change_send_the_right_calls(
    aws: dict[str, Any],
) -> None:
    spec = make_spec(aws)
    deploy_function(aws["lambda"], spec)
    sent: dict[str, dict[str, Any]] = {}
    aws["lambda"].meta.events.register(
        "provide-client-params.lambda",
        lambda params, model, **_: sent.setdefault(model.name, dict(params)),
    )
    result = deploy_function(
        aws["lambda"], replace(spec, architecture="arm64", ephemeral_mb=4096)
    )
    assert result.action == "updated"
    assert result.changes == {
        "architecture": ("x86_64", "arm64"),
        "ephemeral_mb": (512, 4096),
    }
    assert sent["UpdateFunctionCode"]["Architectures"] == ["arm64"]
    assert sent["UpdateFunctionCode"]["ImageUri"] == aws["image"]
    assert sent["UpdateFunctionConfiguration"] == {
        "FunctionName": "cai-infer",
        "EphemeralStorage": {"Size": 4096},
    }


def test_receipt_is_json(aws: dict[str, Any]) -> None:
    result = deploy_function(aws["lambda"], make_spec(aws))
    receipt = json.loads(result.to_json())
    assert receipt["action"] == "created"
    assert receipt["changes"]["timeout_s"] == {"old": None, "new": 300}
    assert receipt["function_arn"] == result.function_arn
    assert isinstance(result, DeployResult)


def test_missing_role_is_a_clear_error(aws: dict[str, Any]) -> None:
    missing = aws["role_arn"].replace("cai-lambda", "no-such-role")
    with pytest.raises(CaiError, match="no-such-role") as info:
        deploy_function(aws["lambda"], make_spec(aws, role_arn=missing))
    assert "cai-infer" in str(info.value)
    assert "iam:PassRole" in str(info.value)
    assert "CreateFunction" in str(info.value)


def test_missing_image_is_a_clear_error(
    aws: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The moto server runs in this process: make it look the image up in its ECR.
    monkeypatch.setenv("MOTO_LAMBDA_STUB_ECR", "false")
    aws["client"]("ecr").create_repository(repositoryName="cai-astromae")
    with pytest.raises(CaiError, match="cai-astromae:test") as info:
        deploy_function(aws["lambda"], make_spec(aws))
    assert "ECR" in str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [
        ("memory_mb", 20000, "aws.memory_mb"),
        ("memory_mb", 64, "aws.memory_mb"),
        ("timeout_s", 901, "aws.timeout_s"),
        ("ephemeral_mb", 256, "aws.ephemeral_mb"),
        ("ephemeral_mb", 10241, "aws.ephemeral_mb"),
        ("architecture", "aarch64", "aws.architecture"),
        ("name", "bad name", "aws.function_name"),
        ("role_arn", "cai-lambda", "aws.role_arn"),
        ("environment", {"1BAD": "x"}, "function environment"),
        ("environment", {"CAI_N": 3}, "environment variable CAI_N"),
    ],
)
def test_bad_spec_is_a_config_error(field: str, value: Any, key: str) -> None:
    fields: dict[str, Any] = {
        "name": "cai-infer",
        "image_uri": "123456789012.dkr.ecr.us-east-1.amazonaws.com/cai:1",
        "role_arn": "arn:aws:iam::123456789012:role/cai-lambda",
        "memory_mb": 3008,
        "timeout_s": 300,
        field: value,
    }
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        FunctionSpec(**fields)
    if field == "memory_mb":
        assert "128 to 10240" in str(info.value)


def test_function_that_fails_to_turn_active_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # moto reports every function Active at once, so a failed creation is stubbed.
    from botocore.stub import Stubber

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    client = boto3.client("lambda", region_name=REGION)
    spec = FunctionSpec(
        name="cai-infer",
        image_uri="123456789012.dkr.ecr.us-east-1.amazonaws.com/cai:1",
        role_arn="arn:aws:iam::123456789012:role/cai-lambda",
        memory_mb=3008,
        timeout_s=300,
    )
    arn = "arn:aws:lambda:us-east-1:123456789012:function:cai-infer"
    with Stubber(client) as stub:
        stub.add_client_error(
            "get_function", "ResourceNotFoundException", http_status_code=404
        )
        stub.add_response("create_function", {"FunctionArn": arn, "State": "Pending"})
        stub.add_response(
            "get_function",
            {
                "Configuration": {
                    "FunctionArn": arn,
                    "State": "Failed",
                    "StateReason": "image architecture does not match",
                }
            },
        )
        with pytest.raises(CaiError, match="the creation failed") as info:
            deploy_function(client, spec, poll_s=0.01)
    assert "image architecture does not match" in str(info.value)
    assert "cai:1" in str(info.value)
