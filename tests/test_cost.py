"""Cost arithmetic against hand-computed figures and the paper's Lambda cost table."""

from __future__ import annotations

from typing import Any

import pytest

from cai.cost import (
    Prices,
    hpc_cost,
    lambda_cost,
    paper_lambda_table,
    s3_cost,
    stepfunctions_cost,
)
from cai.errors import CaiError, ConfigError, DataFormatError

# us-east-1 list prices, as config/config.yaml carries them.
PRICE_CONFIG: dict[str, Any] = {
    "lambda_request": 2e-7,
    "lambda_gb_s_x86": 0.0000166667,
    "lambda_gb_s_arm64": 0.0000133334,
    "lambda_ephemeral_gb_s": 0.0000000309,
    "s3_put_per_1000": 0.005,
    "s3_get_per_1000": 0.0004,
    "s3_storage_gb_month": 0.023,
    "sfn_transition": 0.000025,
    "hpc_core_hour": 0.05,
    "hpc_gpu_hour": 2.50,
}
EXACT = 1e-12  # relative tolerance: only float rounding differs


@pytest.fixture
def prices() -> Prices:
    return Prices.from_config(PRICE_CONFIG)


def test_lambda_x86_versus_arm64(prices: Prices) -> None:
    # 6 s at 10,240 MB = 6 x 10 GB = 60 GB-s.
    record = [{"billed_ms": 6000, "memory_mb": 10240, "requests": 1}]
    x86 = lambda_cost(record, prices)
    arm = lambda_cost(record, prices, architecture="arm64")
    assert x86["gb_s"] == pytest.approx(60.0, rel=EXACT)
    assert x86["requests"] == 1
    assert x86["request_usd"] == pytest.approx(2e-7, rel=EXACT)
    assert x86["compute_usd"] == pytest.approx(60 * 0.0000166667, rel=EXACT)
    assert x86["ephemeral_usd"] == 0
    assert x86["total_usd"] == pytest.approx(0.001000002 + 2e-7, rel=EXACT)
    assert arm["compute_usd"] == pytest.approx(0.000800004, rel=EXACT)
    assert arm["total_usd"] == pytest.approx(0.000800004 + 2e-7, rel=EXACT)


def test_lambda_ephemeral_storage_above_512_mb(prices: Prices) -> None:
    record = [{"billed_ms": 6000, "memory_mb": 10240, "requests": 1}]
    at_free = lambda_cost(record, prices, ephemeral_mb=512)
    assert at_free["ephemeral_gb_s"] == 0
    assert at_free["ephemeral_usd"] == 0
    full = lambda_cost(record, prices, ephemeral_mb=10240)
    # (10,240 - 512) MB = 9.5 GB for 6 s = 57 GB-s.
    assert full["ephemeral_gb_s"] == pytest.approx(57.0, rel=EXACT)
    assert full["ephemeral_usd"] == pytest.approx(57 * 0.0000000309, rel=EXACT)
    assert full["total_usd"] == pytest.approx(
        2e-7 + 60 * 0.0000166667 + 57 * 0.0000000309, rel=EXACT
    )


def test_lambda_record_with_several_attempts(prices: Prices) -> None:
    # An invocation that failed once and succeeded on retry, and a clean one: both
    # attempts of the first are billed; a throttled attempt never ran and is not listed.
    records = [
        {"billed_ms": 3000 + 2500, "memory_mb": 2048, "requests": 2},
        {"billed_ms": 1000, "memory_mb": 1024, "requests": 1},
    ]
    cost = lambda_cost(records, prices)
    assert cost["requests"] == 3
    assert cost["billed_s"] == pytest.approx(6.5, rel=EXACT)
    assert cost["gb_s"] == pytest.approx(5.5 * 2 + 1 * 1, rel=EXACT)
    assert cost["request_usd"] == pytest.approx(6e-7, rel=EXACT)
    assert cost["compute_usd"] == pytest.approx(12 * 0.0000166667, rel=EXACT)


def test_lambda_no_records_costs_nothing(prices: Prices) -> None:
    assert lambda_cost([], prices)["total_usd"] == 0


def test_lambda_bad_record_names_the_key(prices: Prices) -> None:
    with pytest.raises(DataFormatError, match="record 1 has no 'memory_mb'"):
        lambda_cost(
            [{"billed_ms": 1, "memory_mb": 128, "requests": 1}, {"billed_ms": 1}],
            prices,
        )
    with pytest.raises(DataFormatError, match="billed_ms = -5"):
        lambda_cost([{"billed_ms": -5, "memory_mb": 128, "requests": 1}], prices)
    with pytest.raises(ConfigError, match="'aarch64'"):
        lambda_cost([], prices, architecture="aarch64")


def test_s3_requests_and_storage(prices: Prices) -> None:
    cost = s3_cost(2000, 10000, stored_bytes=50 * 2**30, months=1.0, prices=prices)
    assert cost["put_usd"] == pytest.approx(0.010, rel=EXACT)
    assert cost["get_usd"] == pytest.approx(0.004, rel=EXACT)
    assert cost["stored_gb"] == pytest.approx(50.0, rel=EXACT)
    assert cost["storage_usd"] == pytest.approx(1.15, rel=EXACT)
    assert cost["total_usd"] == pytest.approx(1.164, rel=EXACT)
    requests_only = s3_cost(1, 1, prices=prices)
    assert requests_only["storage_usd"] == 0
    assert requests_only["total_usd"] == pytest.approx(0.000005 + 0.0000004, rel=EXACT)
    with pytest.raises(CaiError, match="puts is -1"):
        s3_cost(-1, 0, prices=prices)


def test_stepfunctions_transitions(prices: Prices) -> None:
    cost = stepfunctions_cost(1000, prices)
    assert cost["transitions"] == 1000
    assert cost["total_usd"] == pytest.approx(0.025, rel=EXACT)


def test_hpc_core_and_gpu_hours(prices: Prices) -> None:
    cost = hpc_cost(core_hours=10, gpu_hours=2, prices=prices)
    assert cost["core_usd"] == pytest.approx(0.5, rel=EXACT)
    assert cost["gpu_usd"] == pytest.approx(5.0, rel=EXACT)
    assert cost["total_usd"] == pytest.approx(5.5, rel=EXACT)


@pytest.mark.parametrize("key", list(PRICE_CONFIG))
def test_missing_price_names_the_key(key: str) -> None:
    config = {k: v for k, v in PRICE_CONFIG.items() if k != key}
    with pytest.raises(ConfigError, match=rf"prices\.{key} is missing"):
        Prices.from_config(config)


@pytest.mark.parametrize("value", [-0.1, "0.2", None, True, float("nan")])
def test_bad_price_names_the_key(value: Any) -> None:
    with pytest.raises(
        ConfigError, match=r"prices\.sfn_transition is .*expected a number"
    ):
        Prices.from_config({**PRICE_CONFIG, "sfn_transition": value})


def test_unknown_price_key_and_metadata() -> None:
    with pytest.raises(ConfigError, match=r"prices\.lambda_gbs is not a known key"):
        Prices.from_config({**PRICE_CONFIG, "lambda_gbs": 1.0})
    meta = {"source": "https://aws.amazon.com/lambda/pricing/", "date": "2026-12"}
    prices = Prices.from_config({**PRICE_CONFIG, **meta, "region": "us-east-1"})
    assert prices.meta == {**meta, "region": "us-east-1"}
    assert Prices.from_config(PRICE_CONFIG).meta == {}
    assert set(Prices.price_keys()) == set(PRICE_CONFIG)


def test_paper_lambda_table_to_the_cent(prices: Prices) -> None:
    table = paper_lambda_table(prices)
    assert [row["partition_mb"] for row in table] == [25, 50, 75, 100]
    assert [row["paper_usd"] for row in table] == [0.16, 0.20, 0.30, 0.38]
    # The paper's product: requests x seconds x GB x 0.00001667.
    assert table[0]["gb_s"] == pytest.approx(517 * 6.55 * 2.8, rel=EXACT)
    assert table[0]["paper_formula_usd"] == pytest.approx(0.15806, abs=1e-5)
    assert table[3]["paper_formula_usd"] == pytest.approx(0.37924, abs=1e-5)
    for row in table:
        cents = round(row["paper_usd"] * 100)
        assert round(row["paper_formula_usd"] * 100) == cents
        assert round(row["compute_usd"] * 100) == cents
        assert round(row["total_usd"] * 100) == cents
        assert row["request_usd"] == pytest.approx(row["requests"] * 2e-7, rel=EXACT)
