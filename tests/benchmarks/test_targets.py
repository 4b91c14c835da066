"""PASS/MISS lines say what was measured against which bound."""
import pytest

from benchmarks.targets import check, format_target


def test_pass_and_miss_lines():
    assert format_target(check("MABN layer 2x64x7x7 vs BN", 1.12, "<=", 1.3)) == \
        "PASS  target  MABN layer 2x64x7x7 vs BN: 1.120x (<= 1.300x)"
    assert format_target(check("MABN ops", 86, "<=", 12, "goal", "ops")) == \
        "MISS  goal    MABN ops: 86 ops (<= 12 ops)"
    assert format_target(check("folded speed", 0.99, ">=", 0.97)).startswith("PASS  target  folded speed: 0.990x")


def test_bound_is_inclusive_and_missing_number_misses():
    assert check("a", 1.0, "<=", 1.0).passed and check("b", 0.97, ">=", 0.97).passed
    missing = check("c", None, "<=", 1.0)
    assert not missing.passed
    assert format_target(missing) == "MISS  target  c: not measured (<= 1.000x)"
    assert missing.as_dict()["passed"] is False


@pytest.mark.parametrize("rule,kind", [("<", "target"), ("<=", "wish")])
def test_bad_rule_or_kind_is_refused(rule, kind):
    with pytest.raises(ValueError):
        check("x", 1.0, rule, 1.0, kind)
