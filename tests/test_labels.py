"""Provider families, label cleaning and the cardinality guard."""

from __future__ import annotations

import pytest

from exporter.config import DEFAULT_PROVIDER_RULES, ProviderRule
from exporter.labels import LabelCleaner, ProviderFamilies, keep_top
from tests.ledger import FAMILY_OF


@pytest.mark.parametrize(("raw", "family"), sorted(FAMILY_OF.items()))
def test_default_rules_classify_the_platform_strings(raw: str, family: str) -> None:
    assert ProviderFamilies(DEFAULT_PROVIDER_RULES).family(raw) == family


def test_first_matching_rule_wins_and_other_is_last() -> None:
    fams = ProviderFamilies(
        [ProviderRule(family="a", pattern="x"), ProviderRule(family="b", pattern="xy")]
    )
    assert fams.family("XY") == "a"
    assert fams.family(None) == "other"
    assert fams.families == ("a", "b", "other")


def test_cleaner_removes_controls_caps_length_and_counts() -> None:
    clean = LabelCleaner(max_length=8)
    assert clean("plain") == "plain"
    assert clean("a\nb\x1bc") == "abc"
    assert clean("🚀 مرحبا") == "🚀 مرحبا"
    assert clean("x" * 20) == "x" * 8
    assert clean("") == "unknown"
    assert clean(None) == "unknown"
    assert clean("a\nb\x1bc") == "abc"
    assert len(clean.altered) == 4


def test_keep_top_by_weight_then_name() -> None:
    assert keep_top({"b": 1.0, "a": 1.0, "c": 5.0, "d": 0.0}, 2) == {"c", "a"}
