"""The paper's claims, checked against the miniature's numbers.

Two top-1 errors count as different only when they differ by more than a margin: the larger of
:data:`MIN_MARGIN` points and twice the pooled seed-to-seed standard deviation of the rows (when
several seeds ran). Each verdict is "reproduced", "not reproduced" or "not measured", with the
numbers it rests on.
"""
from __future__ import annotations

import math
import statistics
from typing import Dict, List, Mapping, Optional, Sequence

__all__ = ["MIN_MARGIN", "SPEED_TOLERANCE", "margin", "check_claims"]

MIN_MARGIN = 2.0          # top-1 error points
SPEED_TOLERANCE = 0.05    # MABN folded within 5% of BN's it/s counts as "costs nothing"


def margin(per_seed: Mapping[str, Sequence[float]]) -> float:
    """``max(MIN_MARGIN, 2 * pooled standard deviation over seeds)``."""
    variances = [statistics.variance(values) for values in per_seed.values() if len(values) >= 2]
    pooled = math.sqrt(statistics.fmean(variances)) if variances else 0.0
    return max(MIN_MARGIN, 2.0 * pooled)


def _claim(name: str, verdict: str, evidence: str) -> Dict[str, str]:
    return {"claim": name, "verdict": verdict, "evidence": evidence}


def check_claims(top1: Mapping[str, float], per_seed: Mapping[str, Sequence[float]],
                 speed_ratio: Optional[float]) -> List[Dict[str, str]]:
    """Verdicts for the four claims; ``top1`` maps row keys (``BN@32``, ...) to mean top-1 error."""
    m = margin(per_seed)
    claims = []
    bn32, bn2, brn2, mabn2 = (top1.get(key) for key in ("BN@32", "BN@2", "BRN@2", "MABN@2"))
    name = "BN degrades sharply at normalization batch 2"
    if bn32 is None or bn2 is None:
        claims.append(_claim(name, "not measured", "BN@32 or BN@2 did not run"))
    else:
        gap = bn2 - bn32
        claims.append(_claim(name, "reproduced" if gap > m else "not reproduced",
                             f"BN@2 {bn2:.2f} vs BN@32 {bn32:.2f} top-1 err: {gap:+.2f} points (margin {m:.2f})"))
    name = "BRN@2 recovers part of BN's loss at batch 2"
    if None in (bn32, bn2, brn2):
        claims.append(_claim(name, "not measured", "BN@32, BN@2 or BRN@2 did not run"))
    else:
        evidence = f"BRN@2 {brn2:.2f}, BN@2 {bn2:.2f}, BN@32 {bn32:.2f} top-1 err (margin {m:.2f})"
        if bn2 - bn32 <= m:
            verdict = "not reproduced (BN@2 did not degrade beyond the margin: nothing to recover)"
        elif brn2 < bn2 - m:
            verdict = "reproduced"
            evidence += f": BRN recovers {100 * (bn2 - brn2) / (bn2 - bn32):.0f}% of the BN@2 - BN@32 gap"
            if brn2 <= bn32 + m:
                verdict += " (all of it, more than the paper's partial recovery)"
        else:
            verdict = "not reproduced"
        claims.append(_claim(name, verdict, evidence))
    name = "MABN@2 matches BN@32"
    if bn32 is None or mabn2 is None:
        claims.append(_claim(name, "not measured", "BN@32 or MABN@2 did not run"))
    else:
        diff = mabn2 - bn32
        verdict = "reproduced" if diff <= m else "not reproduced"
        if diff < -m:
            verdict += " (MABN@2 is better than BN@32 by more than the margin)"
        claims.append(_claim(name, verdict, f"MABN@2 {mabn2:.2f} vs BN@32 {bn32:.2f} top-1 err: {diff:+.2f} points "
                                            f"(margin {m:.2f})"))
    name = "MABN costs nothing at inference (folded into the convs like BN)"
    if speed_ratio is None:
        claims.append(_claim(name, "not measured", "the inference benchmark did not run"))
    else:
        claims.append(_claim(name, "reproduced" if speed_ratio >= 1.0 - SPEED_TOLERANCE else "not reproduced",
                             f"MABN folded runs at {speed_ratio:.3f}x BN's it/s (tolerance {SPEED_TOLERANCE:.0%})"))
    return claims
