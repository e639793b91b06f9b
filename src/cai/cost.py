"""The cost of a run, computed from billed records with every price taken from config.

Cost is one of the paper's comparisons (Lambda against a laptop and SLURM CPU and GPU
jobs), and prices change, differ by region and differ by site for HPC. So no price is
written here: ``Prices`` is built from the ``prices:`` section of the config, which
names each price's unit, source and date, and the functions below only multiply
billed quantities by those prices. Nothing is rounded; formatting is the caller's job.

AWS units used throughout: Lambda compute is billed in GB-seconds with memory in
MB / 1024 GB and the billed duration in ms; S3 storage in GB-months with 1 GB = 2^30
bytes. Free tiers and volume discount tiers are not applied (a run is priced as if the
account had used up its free tier and had not reached a discount tier).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from cai.errors import CaiError, ConfigError, DataFormatError

_logger = logging.getLogger(__name__)

MS_PER_S = 1000.0
SECONDS_PER_HOUR = 3600.0  # HPC: core-hours and GPU-hours
MB_PER_GB = 1024.0  # Lambda: memory in MB / 1024 = GB
BYTES_PER_GB = float(1 << 30)  # S3 storage: 1 GB = 2^30 bytes
REQUESTS_PER_S3_PRICE_UNIT = 1000.0  # S3 request prices are per 1,000 requests
LAMBDA_FREE_EPHEMERAL_MB = 512  # /tmp up to 512 MB is included in the compute price
LAMBDA_ARCHITECTURES = ("x86_64", "arm64")
PRICES_KEY = "prices"
# Optional descriptive keys of the prices section; never used in arithmetic.
PRICE_METADATA_KEYS = ("source", "date", "region", "sources")

# The paper's Lambda cost table: price per GB-s as the paper wrote it (USD), and per
# partition size (MB): requests, duration per request (s), memory (GB), cost (USD).
PAPER_GB_S_USD = 0.00001667
PAPER_LAMBDA_ROWS = (
    (25, 517, 6.55, 2.8, 0.16),
    (50, 259, 11.8, 4.0, 0.20),
    (75, 173, 17.6, 5.9, 0.30),
    (100, 130, 25.0, 7.0, 0.38),
)


@dataclass(frozen=True)
class Prices:
    """Unit prices in USD, read from the ``prices:`` section of the config.

    Attributes:
        lambda_request: Per Lambda request (0.20 USD per million = 2e-7).
        lambda_gb_s_x86: Per GB-second of x86_64 Lambda compute.
        lambda_gb_s_arm64: Per GB-second of arm64 Lambda compute.
        lambda_ephemeral_gb_s: Per GB-second of ephemeral storage above the free 512 MB.
        s3_put_per_1000: Per 1,000 S3 PUT, COPY, POST or LIST requests.
        s3_get_per_1000: Per 1,000 S3 GET or SELECT requests.
        s3_storage_gb_month: Per GB-month of S3 Standard storage.
        sfn_transition: Per Step Functions state transition (standard workflows).
        hpc_core_hour: Per CPU core-hour on the HPC cluster (the site's rate).
        hpc_gpu_hour: Per GPU-hour on the HPC cluster (the site's rate).
        meta: The optional ``source``, ``date`` and ``region`` entries, as given.
    """

    lambda_request: float
    lambda_gb_s_x86: float
    lambda_gb_s_arm64: float
    lambda_ephemeral_gb_s: float
    s3_put_per_1000: float
    s3_get_per_1000: float
    s3_storage_gb_month: float
    sfn_transition: float
    hpc_core_hour: float
    hpc_gpu_hour: float
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def price_keys(cls) -> tuple[str, ...]:
        """The required price keys, in declaration order."""
        return tuple(f.name for f in fields(cls) if f.name != "meta")

    @classmethod
    def from_config(cls, mapping: Mapping[str, Any]) -> Prices:
        """Build from the config's ``prices:`` mapping.

        Args:
            mapping: Every key of ``price_keys()`` with a number >= 0 (USD), and
                optionally ``source``, ``date`` and ``region``.

        Raises:
            ConfigError: A price key is missing, unknown or not a number >= 0.
        """
        if not isinstance(mapping, Mapping):
            raise ConfigError(
                f"{PRICES_KEY} is {type(mapping).__name__}; expected a mapping of price "
                f"keys ({', '.join(cls.price_keys())}) to USD amounts"
            )
        keys = cls.price_keys()
        unknown = sorted(set(mapping) - set(keys) - set(PRICE_METADATA_KEYS))
        if unknown:
            raise ConfigError(
                f"{PRICES_KEY}.{unknown[0]} is not a known key; expected one of "
                f"{', '.join(keys + PRICE_METADATA_KEYS)}"
            )
        values: dict[str, float] = {}
        for key in keys:
            if key not in mapping:
                raise ConfigError(
                    f"{PRICES_KEY}.{key} is missing; expected a price in USD (see "
                    "config/config.yaml for its unit and source)"
                )
            value = mapping[key]
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ConfigError(
                    f"{PRICES_KEY}.{key} is {value!r}; expected a number >= 0 (USD)"
                )
            values[key] = float(value)
        meta = {key: mapping[key] for key in PRICE_METADATA_KEYS if key in mapping}
        return cls(**values, meta=meta)

    def lambda_gb_s(self, architecture: str) -> float:
        """Price per GB-second of Lambda compute on ``architecture``."""
        if architecture == "x86_64":
            return self.lambda_gb_s_x86
        if architecture == "arm64":
            return self.lambda_gb_s_arm64
        raise ConfigError(
            f"architecture is {architecture!r}; expected one of "
            f"{', '.join(LAMBDA_ARCHITECTURES)}"
        )


def lambda_cost(
    invocations: Iterable[Mapping[str, Any]],
    prices: Prices,
    architecture: str = "x86_64",
    ephemeral_mb: int = LAMBDA_FREE_EPHEMERAL_MB,
) -> dict[str, float]:
    """Cost of Lambda invocations: requests, compute and ephemeral storage.

    Each record is one invocation (one partition) with ``billed_ms``, the billed
    duration summed over its executed attempts, ``memory_mb``, the function's memory,
    and ``requests``, the number of executed attempts (throttled attempts never ran
    and are not billed, so they are not counted). GB-s = billed_ms / 1000 x
    memory_mb / 1024. Ephemeral storage is billed for the part above 512 MB:
    (ephemeral_mb - 512) / 1024 GB x billed seconds, nothing at 512 MB or less.

    Args:
        invocations: Billed records, one per invocation.
        prices: Unit prices.
        architecture: ``x86_64`` or ``arm64``; selects the GB-s price.
        ephemeral_mb: The function's ``/tmp`` size in MB.

    Returns:
        ``requests``, ``billed_s``, ``gb_s``, ``ephemeral_gb_s`` and the USD amounts
        ``request_usd``, ``compute_usd``, ``ephemeral_usd`` and ``total_usd``.

    Raises:
        DataFormatError: A record lacks a key or holds a negative or non-numeric value.
        ConfigError: ``architecture`` is not a Lambda architecture.
    """
    gb_s_price = prices.lambda_gb_s(architecture)
    _check_amount("ephemeral_mb", ephemeral_mb)
    requests = 0.0
    billed_s = 0.0
    gb_s = 0.0
    for index, record in enumerate(invocations):
        billed_ms = _record_amount(record, index, "billed_ms")
        memory_mb = _record_amount(record, index, "memory_mb")
        requests += _record_amount(record, index, "requests")
        billed_s += billed_ms / MS_PER_S
        gb_s += billed_ms / MS_PER_S * memory_mb / MB_PER_GB
    extra_gb = max(0.0, ephemeral_mb - LAMBDA_FREE_EPHEMERAL_MB) / MB_PER_GB
    ephemeral_gb_s = extra_gb * billed_s
    request_usd = requests * prices.lambda_request
    compute_usd = gb_s * gb_s_price
    ephemeral_usd = ephemeral_gb_s * prices.lambda_ephemeral_gb_s
    total_usd = request_usd + compute_usd + ephemeral_usd
    _logger.debug(
        "lambda cost: %d requests, %.1f GB-s (%s), %.1f ephemeral GB-s -> %.4f USD",
        requests,
        gb_s,
        architecture,
        ephemeral_gb_s,
        total_usd,
    )
    return {
        "requests": requests,
        "billed_s": billed_s,
        "gb_s": gb_s,
        "ephemeral_gb_s": ephemeral_gb_s,
        "request_usd": request_usd,
        "compute_usd": compute_usd,
        "ephemeral_usd": ephemeral_usd,
        "total_usd": total_usd,
    }


def lambda_run_s3_requests(
    partitions: int, cold_starts: int, invoked: int, fetched: int
) -> tuple[int, int]:
    """S3 (PUT-priced, GET-priced) requests of a Lambda run, as its steps make them:
    per partition a HEAD and a GET, per cold start the model's HEAD and GET, per
    invocation run two PUTs (predictions, then metrics), per result fetched two HEADs
    and two GETs, and a LIST (priced as a PUT) per 500 result keys, plus one."""
    puts = 2 * invoked + fetched // 500 + 1
    gets = 2 * partitions + 2 * cold_starts + 4 * fetched
    return puts, gets


def s3_cost(
    puts: float,
    gets: float,
    stored_bytes: float = 0,
    months: float = 0.0,
    *,
    prices: Prices,
) -> dict[str, float]:
    """Cost of S3 requests and of keeping ``stored_bytes`` for ``months``.

    Args:
        puts: PUT, COPY, POST or LIST requests.
        gets: GET or SELECT requests.
        stored_bytes: Bytes kept in S3 Standard.
        months: How long they are kept, in months (a 30-day month is 1.0).
        prices: Unit prices.

    Returns:
        ``puts``, ``gets``, ``stored_gb``, ``months`` and the USD amounts ``put_usd``,
        ``get_usd``, ``storage_usd`` and ``total_usd``.
    """
    for name, value in (
        ("puts", puts),
        ("gets", gets),
        ("stored_bytes", stored_bytes),
        ("months", months),
    ):
        _check_amount(name, value)
    stored_gb = stored_bytes / BYTES_PER_GB
    put_usd = puts / REQUESTS_PER_S3_PRICE_UNIT * prices.s3_put_per_1000
    get_usd = gets / REQUESTS_PER_S3_PRICE_UNIT * prices.s3_get_per_1000
    storage_usd = stored_gb * months * prices.s3_storage_gb_month
    return {
        "puts": float(puts),
        "gets": float(gets),
        "stored_gb": stored_gb,
        "months": float(months),
        "put_usd": put_usd,
        "get_usd": get_usd,
        "storage_usd": storage_usd,
        "total_usd": put_usd + get_usd + storage_usd,
    }


def stepfunctions_cost(transitions: float, prices: Prices) -> dict[str, float]:
    """Cost of Step Functions state transitions (standard workflows).

    Args:
        transitions: State transitions of the run, child executions included.
        prices: Unit prices.

    Returns:
        ``transitions``, ``transition_usd`` and ``total_usd``.
    """
    _check_amount("transitions", transitions)
    transition_usd = transitions * prices.sfn_transition
    return {
        "transitions": float(transitions),
        "transition_usd": transition_usd,
        "total_usd": transition_usd,
    }


def hpc_cost(core_hours: float, gpu_hours: float, prices: Prices) -> dict[str, float]:
    """Cost of HPC jobs at the site's core-hour and GPU-hour rates.

    Args:
        core_hours: CPU core-hours allocated (cores x wall hours).
        gpu_hours: GPU-hours allocated (GPUs x wall hours).
        prices: Unit prices.

    Returns:
        ``core_hours``, ``gpu_hours`` and the USD amounts ``core_usd``, ``gpu_usd`` and
        ``total_usd``.
    """
    _check_amount("core_hours", core_hours)
    _check_amount("gpu_hours", gpu_hours)
    core_usd = core_hours * prices.hpc_core_hour
    gpu_usd = gpu_hours * prices.hpc_gpu_hour
    return {
        "core_hours": float(core_hours),
        "gpu_hours": float(gpu_hours),
        "core_usd": core_usd,
        "gpu_usd": gpu_usd,
        "total_usd": core_usd + gpu_usd,
    }


def paper_lambda_table(prices: Prices) -> list[dict[str, float]]:
    """The paper's Lambda cost table, recomputed from its inputs.

    The paper multiplies requests x duration (s) x memory (GB) x 0.00001667 USD per
    GB-s, with the memory in GB exactly as it prints it (2.8, 4.0, 5.9, 7.0), the
    price rounded to 0.00001667, no request charge and no ephemeral storage, and
    rounds the product to the cent: 0.158 -> 0.16, 0.204 -> 0.20, 0.299 -> 0.30,
    0.379 -> 0.38. ``paper_formula_usd`` is that product. ``compute_usd`` is the same
    GB-s at the configured x86_64 price (0.0000166667), and ``total_usd`` adds the
    request charge (about 0.0001 USD here); both round to the same cents as the paper.
    The rows go through ``lambda_cost`` with one record per partition size.

    Args:
        prices: Unit prices.

    Returns:
        One row per partition size: ``partition_mb``, ``requests``, ``duration_s``,
        ``memory_gb``, ``gb_s``, ``paper_usd`` (as printed), ``paper_formula_usd``,
        ``request_usd``, ``compute_usd`` and ``total_usd``.
    """
    rows = []
    for partition_mb, requests, duration_s, memory_gb, paper_usd in PAPER_LAMBDA_ROWS:
        record = {
            "billed_ms": requests * duration_s * MS_PER_S,
            "memory_mb": memory_gb * MB_PER_GB,
            "requests": requests,
        }
        cost = lambda_cost([record], prices, architecture="x86_64")
        rows.append(
            {
                "partition_mb": float(partition_mb),
                "requests": float(requests),
                "duration_s": duration_s,
                "memory_gb": memory_gb,
                "gb_s": cost["gb_s"],
                "paper_usd": paper_usd,
                "paper_formula_usd": requests * duration_s * memory_gb * PAPER_GB_S_USD,
                "request_usd": cost["request_usd"],
                "compute_usd": cost["compute_usd"],
                "total_usd": cost["total_usd"],
            }
        )
    return rows


def _check_amount(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise CaiError(f"{name} is {value!r}; expected a number >= 0")


def _record_amount(record: Mapping[str, Any], index: int, key: str) -> float:
    if key not in record:
        raise DataFormatError(
            f"invocation record {index} has no {key!r}; expected billed_ms, memory_mb and "
            "requests"
        )
    value = record[key]
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise DataFormatError(
            f"invocation record {index} has {key} = {value!r}; expected a number >= 0"
        )
    return float(value)
