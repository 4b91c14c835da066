"""Targets of the benchmark: a measured value, a bound, and one PASS/MISS line each."""
from __future__ import annotations

import operator
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

__all__ = ["Target", "check", "format_target"]

_RULES = {"<=": operator.le, ">=": operator.ge}


@dataclass(frozen=True)
class Target:
    """``measured rule limit`` must hold. ``kind`` is "target" (a requirement) or "goal" (beyond it)."""

    name: str
    measured: Optional[float]
    rule: str
    limit: float
    kind: str = "target"
    unit: str = "x"

    @property
    def passed(self) -> bool:
        """False when nothing was measured: a missing number never passes."""
        return self.measured is not None and _RULES[self.rule](self.measured, self.limit)

    def as_dict(self) -> Dict[str, object]:
        return dict(asdict(self), passed=self.passed)


def check(name: str, measured: Optional[float], rule: str, limit: float, kind: str = "target",
          unit: str = "x") -> Target:
    """A :class:`Target`, with ``rule`` and ``kind`` validated."""
    if rule not in _RULES:
        raise ValueError(f"rule must be one of {sorted(_RULES)}, got {rule!r}")
    if kind not in ("target", "goal"):
        raise ValueError(f"kind must be 'target' or 'goal', got {kind!r}")
    return Target(name, measured, rule, limit, kind, unit)


def _number(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.3f}x"
    if unit in ("ops", "kernels"):
        return f"{value:.0f} {unit}"
    if unit == "fraction":
        return f"{100 * value:.1f}%"
    return f"{value:.2f} {unit}"


def format_target(target: Target) -> str:
    """E.g. ``PASS  target  MABN layer 2x64x7x7 vs BN: 1.120x (<= 1.300x)``."""
    measured = "not measured" if target.measured is None else _number(target.measured, target.unit)
    return (f"{'PASS' if target.passed else 'MISS'}  {target.kind:<6}  {target.name}: {measured} "
            f"({target.rule} {_number(target.limit, target.unit)})")

