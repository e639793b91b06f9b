"""Create or update the inference Lambda function from a container image, idempotently.

The workflow deploys before every AWS run, so deploying must be cheap and safe to
repeat: the live configuration is read first and compared field by field with the
wanted one; only what differs is changed, and an unchanged function sees no mutating
call at all. Each step waits until Lambda reports the function ready (a new image
function is ``Pending`` for a while, an update is ``InProgress``), so the run that
follows never invokes a half-updated function. AWS errors are turned into
``CaiError`` messages that name the function, the image or role, and what to check.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, WaiterError

from cai.errors import CaiError, ConfigError

_logger = logging.getLogger(__name__)

# Lambda's limits (https://docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html).
LAMBDA_MEMORY_MIN_MB = 128
LAMBDA_MEMORY_MAX_MB = 10240
LAMBDA_TIMEOUT_MIN_S = 1
LAMBDA_TIMEOUT_MAX_S = 900  # 15 min
LAMBDA_EPHEMERAL_MIN_MB = 512  # the free /tmp every function gets
LAMBDA_EPHEMERAL_MAX_MB = 10240  # 10 GiB /tmp
LAMBDA_ARCHITECTURES = ("x86_64", "arm64")
LAMBDA_NAME_MAX_CHARS = 64
LAMBDA_DESCRIPTION_MAX_CHARS = 256
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
# Lambda environment variable names: a letter, then letters, digits or underscores.
_ENV_KEY_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]*")

# How long to wait for a created function to turn Active or an update to finish. An
# image function is optimised on creation, which can take minutes for a large image.
DEPLOY_WAIT_MAX_S = 600.0
DEPLOY_POLL_S = 5.0

# What the deploying identity needs; named in every access error.
REQUIRED_PERMISSIONS = (
    "lambda:GetFunction",
    "lambda:CreateFunction",
    "lambda:UpdateFunctionConfiguration",
    "lambda:UpdateFunctionCode",
    "iam:PassRole",
)

ACTIONS = ("created", "updated", "unchanged")
# Fields that only UpdateFunctionCode changes; every other one is configuration.
_CODE_FIELDS = ("image_uri", "architecture")
_CONFIG_FIELDS = (
    "role_arn",
    "memory_mb",
    "timeout_s",
    "ephemeral_mb",
    "environment",
    "description",
)


@dataclass(frozen=True)
class FunctionSpec:
    """The wanted state of the inference function.

    Attributes:
        name: Function name (letters, digits, ``-`` and ``_``, at most 64 characters).
        image_uri: ECR image, ``<account>.dkr.ecr.<region>.amazonaws.com/<repo>:<tag>`` or
            ``...@sha256:<digest>``.
        role_arn: ARN of the execution role Lambda assumes.
        memory_mb: Memory in MB, 128 to 10,240; CPU share grows with it.
        timeout_s: Timeout in seconds, 1 to 900.
        ephemeral_mb: Size of ``/tmp`` in MB, 512 to 10,240; above 512 MB it is billed.
        architecture: ``x86_64`` or ``arm64``; the image must be built for it.
        environment: Environment variables of the function.
        description: Free text shown in the console.
    """

    name: str
    image_uri: str
    role_arn: str
    memory_mb: int
    timeout_s: int
    ephemeral_mb: int = LAMBDA_EPHEMERAL_MIN_MB
    architecture: str = "x86_64"
    environment: dict[str, str] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        if (
            not isinstance(self.name, str)
            or not _NAME_PATTERN.fullmatch(self.name)
            or len(self.name) > LAMBDA_NAME_MAX_CHARS
        ):
            raise ConfigError(
                f"aws.function_name is {self.name!r}; expected 1 to {LAMBDA_NAME_MAX_CHARS} "
                "letters, digits, '-' or '_'"
            )
        if not isinstance(self.image_uri, str) or not self.image_uri.strip():
            raise ConfigError(
                f"aws.image_uri is {self.image_uri!r}; expected an ECR image URI such as "
                "<account>.dkr.ecr.<region>.amazonaws.com/<repository>:<tag>"
            )
        if not isinstance(self.role_arn, str) or ":role/" not in self.role_arn:
            raise ConfigError(
                f"aws.role_arn is {self.role_arn!r}; expected an IAM role ARN such as "
                "arn:aws:iam::<account>:role/<name>"
            )
        _check_int_range(
            "memory_mb",
            self.memory_mb,
            LAMBDA_MEMORY_MIN_MB,
            LAMBDA_MEMORY_MAX_MB,
            "MB",
        )
        _check_int_range(
            "timeout_s", self.timeout_s, LAMBDA_TIMEOUT_MIN_S, LAMBDA_TIMEOUT_MAX_S, "s"
        )
        _check_int_range(
            "ephemeral_mb",
            self.ephemeral_mb,
            LAMBDA_EPHEMERAL_MIN_MB,
            LAMBDA_EPHEMERAL_MAX_MB,
            "MB",
        )
        if self.architecture not in LAMBDA_ARCHITECTURES:
            raise ConfigError(
                f"aws.architecture is {self.architecture!r}; expected one of "
                f"{', '.join(LAMBDA_ARCHITECTURES)}"
            )
        if not isinstance(self.environment, Mapping):
            raise ConfigError(
                f"the function environment is {type(self.environment).__name__}; "
                "expected a mapping of variable names to string values"
            )
        for key, value in self.environment.items():
            if not isinstance(key, str) or not _ENV_KEY_PATTERN.fullmatch(key):
                raise ConfigError(
                    f"the function environment has the variable name {key!r}; expected a letter "
                    "followed by letters, digits or '_'"
                )
            if not isinstance(value, str):
                raise ConfigError(
                    f"function environment variable {key} is {value!r}; expected a "
                    "string (quote it in the config)"
                )
        if (
            not isinstance(self.description, str)
            or len(self.description) > LAMBDA_DESCRIPTION_MAX_CHARS
        ):
            raise ConfigError(
                f"the function description is {self.description!r}; expected a string of at most "
                f"{LAMBDA_DESCRIPTION_MAX_CHARS} characters"
            )
        # A private copy, so that the caller's mapping cannot change a frozen spec.
        object.__setattr__(self, "environment", dict(self.environment))

    def wanted(self) -> dict[str, Any]:
        """The fields compared with the live function, by spec field name."""
        return {
            "image_uri": self.image_uri,
            "architecture": self.architecture,
            "role_arn": self.role_arn,
            "memory_mb": self.memory_mb,
            "timeout_s": self.timeout_s,
            "ephemeral_mb": self.ephemeral_mb,
            "environment": dict(self.environment),
            "description": self.description,
        }


@dataclass(frozen=True)
class DeployResult:
    """What one deployment did.

    Attributes:
        name: Function name.
        action: ``created``, ``updated`` or ``unchanged``.
        changes: Spec field -> (old, new) for every field that changed; on creation
            every field, with old ``None``.
        function_arn: ARN of the function.
        seconds: Wall time of the deployment, waits included.
    """

    name: str
    action: str
    changes: dict[str, tuple[Any, Any]]
    function_arn: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record of the deployment, for a receipt file."""
        return {
            "name": self.name,
            "action": self.action,
            "changes": {
                key: {"old": old, "new": new}
                for key, (old, new) in self.changes.items()
            },
            "function_arn": self.function_arn,
            "seconds": self.seconds,
        }

    def to_json(self) -> str:
        """``to_dict()`` as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def deploy_function(
    lambda_client: Any,
    spec: FunctionSpec,
    *,
    wait_max_s: float = DEPLOY_WAIT_MAX_S,
    poll_s: float = DEPLOY_POLL_S,
) -> DeployResult:
    """Make the Lambda function match ``spec``, creating it if it does not exist.

    Args:
        lambda_client: A boto3 Lambda client for the function's account and region.
        spec: The wanted function.
        wait_max_s: Longest wait, in seconds, for each create or update to finish.
        poll_s: Seconds between two readings of the function's state while waiting.

    Returns:
        What was done, with the changed fields and the function's ARN.

    Raises:
        CaiError: Lambda refused a call (permissions, role, image), or the function did
            not become ready within ``wait_max_s``.
    """
    start = time.monotonic()
    wanted = spec.wanted()
    live_response = _get_function(lambda_client, spec)
    if live_response is None:
        response = _call(
            lambda_client.create_function,
            "CreateFunction",
            spec,
            FunctionName=spec.name,
            PackageType="Image",
            Code={"ImageUri": spec.image_uri},
            Role=spec.role_arn,
            MemorySize=spec.memory_mb,
            Timeout=spec.timeout_s,
            EphemeralStorage={"Size": spec.ephemeral_mb},
            Architectures=[spec.architecture],
            Environment={"Variables": dict(spec.environment)},
            Description=spec.description,
        )
        _wait(lambda_client, "function_active_v2", spec, "creation", wait_max_s, poll_s)
        action = "created"
        changes = {key: (None, value) for key, value in wanted.items()}
        function_arn = response["FunctionArn"]
    else:
        configuration = live_response["Configuration"]
        function_arn = configuration["FunctionArn"]
        package_type = configuration.get("PackageType", "Zip")
        if package_type != "Image":
            raise CaiError(
                f"deploy {spec.name}: the function exists with PackageType {package_type}; "
                f"an image function cannot replace it in place. Delete the function or set "
                f"aws.function_name to another name"
            )
        live = _live_fields(live_response)
        changes = {
            key: (live[key], value)
            for key, value in wanted.items()
            if live[key] != value
        }
        if changes:
            _wait_until_settled(lambda_client, spec, configuration, wait_max_s, poll_s)
            _apply_changes(lambda_client, spec, changes, wait_max_s, poll_s)
            action = "updated"
        else:
            action = "unchanged"
    seconds = time.monotonic() - start
    detail = f" ({_describe(changes, action)})" if changes else ""
    _logger.info("deploy %s: %s%s in %.1f s", spec.name, action, detail, seconds)
    return DeployResult(spec.name, action, changes, function_arn, seconds)


def _check_int_range(key: str, value: Any, low: int, high: int, unit: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not low <= value <= high
    ):
        raise ConfigError(
            f"aws.{key} is {value!r}; expected an integer from {low} to {high} ({unit}, "
            "Lambda's limits)"
        )


def _live_fields(response: Mapping[str, Any]) -> dict[str, Any]:
    """The live function's values of the spec fields, with Lambda's defaults filled in."""
    configuration = response["Configuration"]
    architectures = configuration.get("Architectures") or ["x86_64"]
    environment = (configuration.get("Environment") or {}).get("Variables") or {}
    ephemeral = (configuration.get("EphemeralStorage") or {}).get(
        "Size", LAMBDA_EPHEMERAL_MIN_MB
    )
    return {
        "image_uri": (response.get("Code") or {}).get("ImageUri"),
        "architecture": architectures[0],
        "role_arn": configuration.get("Role"),
        "memory_mb": configuration.get("MemorySize"),
        "timeout_s": configuration.get("Timeout"),
        "ephemeral_mb": ephemeral,
        "environment": dict(environment),
        "description": configuration.get("Description") or "",
    }


def _get_function(lambda_client: Any, spec: FunctionSpec) -> dict[str, Any] | None:
    """GetFunction's answer, or ``None`` when the function does not exist."""
    try:
        return lambda_client.get_function(FunctionName=spec.name)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
            return None
        raise _client_error(exc, "GetFunction", spec) from exc
    except BotoCoreError as exc:
        raise _transport_error(exc, "GetFunction", spec) from exc


def _apply_changes(
    lambda_client: Any,
    spec: FunctionSpec,
    changes: Mapping[str, tuple[Any, Any]],
    wait_max_s: float,
    poll_s: float,
) -> None:
    """Update the code, then the configuration, waiting for each to finish."""
    if any(key in changes for key in _CODE_FIELDS):
        _call(
            lambda_client.update_function_code,
            "UpdateFunctionCode",
            spec,
            FunctionName=spec.name,
            ImageUri=spec.image_uri,
            Architectures=[spec.architecture],
        )
        _wait(
            lambda_client,
            "function_updated_v2",
            spec,
            "code update",
            wait_max_s,
            poll_s,
        )
    if any(key in changes for key in _CONFIG_FIELDS):
        updates: dict[str, Any] = {}
        if "role_arn" in changes:
            updates["Role"] = spec.role_arn
        if "memory_mb" in changes:
            updates["MemorySize"] = spec.memory_mb
        if "timeout_s" in changes:
            updates["Timeout"] = spec.timeout_s
        if "ephemeral_mb" in changes:
            updates["EphemeralStorage"] = {"Size": spec.ephemeral_mb}
        if "environment" in changes:
            updates["Environment"] = {"Variables": dict(spec.environment)}
        if "description" in changes:
            updates["Description"] = spec.description
        _call(
            lambda_client.update_function_configuration,
            "UpdateFunctionConfiguration",
            spec,
            FunctionName=spec.name,
            **updates,
        )
        _wait(
            lambda_client,
            "function_updated_v2",
            spec,
            "configuration update",
            wait_max_s,
            poll_s,
        )


def _wait_until_settled(
    lambda_client: Any,
    spec: FunctionSpec,
    configuration: Mapping[str, Any],
    wait_max_s: float,
    poll_s: float,
) -> None:
    """Wait out a creation or update still in progress; Lambda rejects a second one."""
    if configuration.get("State") == "Pending":
        _wait(
            lambda_client,
            "function_active_v2",
            spec,
            "earlier creation",
            wait_max_s,
            poll_s,
        )
    if configuration.get("LastUpdateStatus") == "InProgress":
        _wait(
            lambda_client,
            "function_updated_v2",
            spec,
            "earlier update",
            wait_max_s,
            poll_s,
        )


def _wait(
    lambda_client: Any,
    waiter_name: str,
    spec: FunctionSpec,
    what: str,
    wait_max_s: float,
    poll_s: float,
) -> None:
    """Wait with a boto3 waiter, at most ``wait_max_s`` seconds, polling every ``poll_s``."""
    attempts = max(1, math.ceil(wait_max_s / poll_s))
    start = time.monotonic()
    try:
        lambda_client.get_waiter(waiter_name).wait(
            FunctionName=spec.name,
            WaiterConfig={"Delay": poll_s, "MaxAttempts": attempts},
        )
    except WaiterError as exc:
        last = exc.last_response or {}
        if "Error" in last:
            error = last["Error"]
            raise CaiError(
                f"deploy {spec.name}: reading the function's state after its {what} failed "
                f"with {error.get('Code')}: {error.get('Message')}; check that the caller "
                f"may {', '.join(REQUIRED_PERMISSIONS)}"
            ) from exc
        configuration = last.get("Configuration") or {}
        failed = "Failed" in (
            configuration.get("State"),
            configuration.get("LastUpdateStatus"),
        )
        outcome = "failed" if failed else f"did not finish within {wait_max_s:g} s"
        raise CaiError(
            f"deploy {spec.name}: the {what} {outcome} "
            f"(State {configuration.get('State')}: {configuration.get('StateReason')}; "
            f"LastUpdateStatus {configuration.get('LastUpdateStatus')}: "
            f"{configuration.get('LastUpdateStatusReason')}); check that image "
            f"{spec.image_uri} exists, was built for {spec.architecture} and starts, and "
            f"that role {spec.role_arn} can be assumed by Lambda"
        ) from exc
    except BotoCoreError as exc:
        raise _transport_error(exc, "GetFunction", spec) from exc
    _logger.debug(
        "deploy %s: %s finished after %.1f s", spec.name, what, time.monotonic() - start
    )


def _call(method: Any, operation: str, spec: FunctionSpec, **kwargs: Any) -> Any:
    """Call a Lambda API, turning its errors into ``CaiError``."""
    try:
        return method(**kwargs)
    except ClientError as exc:
        raise _client_error(exc, operation, spec) from exc
    except BotoCoreError as exc:
        raise _transport_error(exc, operation, spec) from exc


def _client_error(exc: ClientError, operation: str, spec: FunctionSpec) -> CaiError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    message = str(error.get("Message", ""))
    lowered = f"{code} {message}".lower()
    if (
        "accessdenied" in lowered
        or "not authorized" in lowered
        or "unauthorized" in lowered
    ):
        hint = (
            f"check that the caller may {', '.join(REQUIRED_PERMISSIONS)} (iam:PassRole on "
            f"{spec.role_arn})"
        )
    elif "role" in lowered or "assume" in lowered:
        hint = (
            f"check that role {spec.role_arn} exists in the function's account, that its "
            "trust policy lets lambda.amazonaws.com call sts:AssumeRole, and that the caller "
            "has iam:PassRole on it (a role created seconds ago may need a little time)"
        )
    elif "image" in lowered or "repository" in lowered or "ecr" in lowered:
        hint = (
            f"check that image {spec.image_uri} has been pushed to ECR in the function's "
            "account and region, that the repository policy lets Lambda pull it "
            f"(ecr:BatchGetImage, ecr:GetDownloadUrlForLayer) and that it was built for "
            f"{spec.architecture}"
        )
    elif "resourceconflict" in lowered:
        hint = "another create or update of the function is in progress; run again when it ends"
    elif "toomanyrequests" in lowered or "throttl" in lowered:
        hint = "the Lambda API throttled the request; run again in a minute"
    else:
        hint = (
            f"check image {spec.image_uri}, role {spec.role_arn} and that the caller may "
            f"{', '.join(REQUIRED_PERMISSIONS)}"
        )
    return CaiError(
        f"deploy {spec.name}: {operation} failed with {code or 'an error'}: {message}; "
        f"{hint}"
    )


def _transport_error(
    exc: BotoCoreError, operation: str, spec: FunctionSpec
) -> CaiError:
    return CaiError(
        f"deploy {spec.name}: {operation} could not reach Lambda ({exc}); check the AWS "
        "credentials, region and network"
    )


def _describe(changes: Mapping[str, tuple[Any, Any]], action: str) -> str:
    """One-line summary of the changes; environment values are not logged, only names."""
    parts = []
    for key, (old, new) in changes.items():
        if key == "environment":
            parts.append(_describe_environment(old or {}, new or {}, action))
        elif action == "created":
            parts.append(f"{key} {_show(new)}")
        else:
            parts.append(f"{key} {_show(old)} -> {_show(new)}")
    return ", ".join(parts)


def _show(value: Any) -> str:
    """A value for the log line; an empty string is shown as ''."""
    return repr(value) if value == "" else str(value)


def _describe_environment(
    old: Mapping[str, str], new: Mapping[str, str], action: str
) -> str:
    if action == "created":
        return f"environment {', '.join(sorted(new)) or '(none)'}"
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed = sorted(key for key in set(old) & set(new) if old[key] != new[key])
    words = [f"+{key}" for key in added] + [f"-{key}" for key in removed]
    words += [f"~{key}" for key in changed]
    return f"environment {' '.join(words)}"
