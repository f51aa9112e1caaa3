"""Integer pricing: charges, holds and catalog prices, with expected values worked by hand."""

from __future__ import annotations

import pytest

from broker.catalog import load_catalog, to_micro_usd
from broker.pricing import hold_micro_usd, prompt_tokens_upper_bound, token_cost_micro_usd
from broker.settings import DEFAULT_CATALOG_PATH


def test_cost_rounds_up_to_whole_micro_usd() -> None:
    # 10 tokens at $0.1358/M = 1.358 micro-dollars, rounded up to 2.
    assert token_cost_micro_usd(10, 0, 135_800, 271_600) == 2
    # 1,000,000 input and 1,000,000 output tokens of gpt-5.4 cost exactly $6.625.
    assert token_cost_micro_usd(1_000_000, 1_000_000, 2_375_000, 4_250_000) == 6_625_000
    assert token_cost_micro_usd(0, 0, 5_000_000, 25_000_000) == 0


def test_dollar_prices_become_integers() -> None:
    assert to_micro_usd("0.1358") == 135_800
    assert to_micro_usd("2.375") == 2_375_000
    with pytest.raises(ValueError):
        to_micro_usd("0.0000001")


def test_prompt_bound_counts_utf8_bytes() -> None:
    body = {"messages": [{"role": "user", "content": "héllo 你好"}]}
    # 13 UTF-8 bytes ("é" takes 2, each CJK character 3), plus 8 per message and 8 for the reply.
    assert prompt_tokens_upper_bound(body) == 13 + 8 + 8


def test_hold_covers_max_tokens_times_n() -> None:
    body = {"messages": [{"role": "user", "content": "abcd"}], "max_tokens": 100, "n": 2}
    # (4 + 16) input tokens at $5/M and 200 output tokens at $25/M: 100 + 5000 micro-USD.
    assert hold_micro_usd(body, 5_000_000, 25_000_000, 32_000) == 5_100


def test_hold_without_limit_uses_model_max_output() -> None:
    body = {"messages": [{"role": "user", "content": ""}]}
    assert hold_micro_usd(body, 0, 1_000_000, 8_192) == 8_192


@pytest.mark.parametrize(
    ("model", "input_price", "output_price"),
    [
        ("claude-opus-4-7", 5_000_000, 25_000_000),
        ("gpt-5.4", 2_375_000, 4_250_000),
        ("deepseek-v4-flash", 135_800, 271_600),
        ("deepseek-v3.2", 248_400, 701_200),
    ],
)
def test_catalog_prices(model: str, input_price: int, output_price: int) -> None:
    catalog = load_catalog(DEFAULT_CATALOG_PATH)
    assert catalog.models[model].pricing.input_per_mtok == input_price
    assert catalog.models[model].pricing.output_per_mtok == output_price


def test_catalog_covers_fourteen_providers() -> None:
    catalog = load_catalog(DEFAULT_CATALOG_PATH)
    assert len(catalog.providers) == 14
    assert len(catalog.models) >= 40
    assert catalog.queues_for_region("hk")[0].endswith(".hk.interactive")


def test_base_url_override_most_specific_wins() -> None:
    catalog = load_catalog(
        DEFAULT_CATALOG_PATH,
        {"openai": "http://a/v1", "openai.hk": "http://b/v1", "*.us": "http://c/v1"},
    )
    assert catalog.base_url("openai", "hk") == "http://b/v1"
    assert catalog.base_url("openai", "us") == "http://a/v1"
    assert catalog.base_url("deepseek", "us") == "http://c/v1"
    assert catalog.base_url("deepseek", "hk") == "https://api.deepseek.com/v1"
