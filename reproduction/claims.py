"""The paper's claims, judged on the miniature's numbers by one stated rule.

Two means over seeds differ when their difference exceeds both :data:`SE_MULTIPLE` standard
errors of the difference (Welch: ``sqrt(sd1^2/n1 + sd2^2/n2)``, sd over seeds) and
:data:`MIN_POINTS` point (:data:`RULE`). A claim of a difference is reproduced when the
difference counts and has the paper's sign. A claim that two configurations match needs more
than a difference that does not count (a wide seed spread hides any difference): it is reproduced
when the difference lies within :data:`EQUIVALENCE_POINTS` points even at its far end of 2
standard errors (``|diff| + 2 SE <= EQUIVALENCE_POINTS``), not reproduced when the difference
counts, and inconclusive otherwise. With fewer than two seeds on either side nothing is judged. Inference speed compares folded MABN with folded BN round by round: the claim holds when
the median speed ratio is within the interquartile range of the per-round ratios of 1.
"""
from __future__ import annotations

import math
import statistics
from typing import Dict, List, Mapping, Optional, Sequence

__all__ = ["SE_MULTIPLE", "MIN_POINTS", "EQUIVALENCE_POINTS", "MIN_SPEED_ROUNDS", "RULE", "SPEED_RULE", "ONE_SEED", "compare",
           "speed_comparison", "check_claims"]

SE_MULTIPLE = 2.0
MIN_POINTS = 1.0
EQUIVALENCE_POINTS = 2.0
MIN_SPEED_ROUNDS = 4
ONE_SEED = "one seed: not judged"
RULE = (f"a difference of two means over seeds counts when it exceeds both {SE_MULTIPLE:g} standard errors of the "
        f"difference (Welch: sqrt(sd1²/n1 + sd2²/n2), sd over seeds) and {MIN_POINTS:g} point; a \"matches\" claim "
        f"is reproduced when |difference| + {SE_MULTIPLE:g} SE <= {EQUIVALENCE_POINTS:g} points, not reproduced when "
        f"the difference counts, inconclusive otherwise; with one seed nothing is judged")
SPEED_RULE = ("folded MABN costs nothing when the median over rounds of (folded BN time / folded MABN time) is within "
              "the interquartile range of those per-round ratios of 1.00")


def compare(first: Sequence[float], second: Sequence[float]) -> Dict[str, object]:
    """``mean(first) - mean(second)``, its Welch standard error, the threshold and whether it counts
    (``judged`` False with fewer than two values on either side)."""
    difference = statistics.fmean(first) - statistics.fmean(second)
    result: Dict[str, object] = {"difference": difference, "n": [len(first), len(second)], "judged": False,
                                 "se": None, "threshold": None, "counts": None}
    if min(len(first), len(second)) < 2:
        return result
    se = math.sqrt(statistics.variance(first) / len(first) + statistics.variance(second) / len(second))
    threshold = max(SE_MULTIPLE * se, MIN_POINTS)
    result.update(judged=True, se=se, threshold=threshold, counts=abs(difference) > threshold)
    return result


def _claim(name: str, verdict: str, evidence: str, numbers: Optional[dict] = None) -> Dict[str, object]:
    return {"claim": name, "verdict": verdict, "evidence": evidence, "numbers": numbers}


def _said(c: Dict[str, object]) -> str:
    """``+9.40 points (2 SE 1.20, threshold 1.20, n 3 and 3)``; without the threshold when not judged."""
    n = " and ".join(map(str, c["n"]))
    if not c["judged"]:
        return f"{c['difference']:+.2f} points (n {n})"
    return f"{c['difference']:+.2f} points (2 SE {SE_MULTIPLE * c['se']:.2f}, threshold {c['threshold']:.2f}, n {n})"


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values)


def _degrades(runs: Mapping[str, Sequence[float]]) -> Dict[str, object]:
    name = "BN degrades sharply at normalization batch 2"
    if not runs.get("BN@32") or not runs.get("BN@2"):
        return _claim(name, "not measured", "BN@32 or BN@2 did not run")
    c = compare(runs["BN@2"], runs["BN@32"])
    verdict = ONE_SEED if not c["judged"] else "reproduced" if c["counts"] and c["difference"] > 0 else "not reproduced"
    return _claim(name, verdict, f"BN@2 {_mean(runs['BN@2']):.2f} - BN@32 {_mean(runs['BN@32']):.2f} top-1 err = "
                                 f"{_said(c)}", c)


def _recovers(runs: Mapping[str, Sequence[float]]) -> Dict[str, object]:
    name = "BRN@2 recovers part of BN's loss at batch 2"
    if not all(runs.get(key) for key in ("BN@32", "BN@2", "BRN@2")):
        return _claim(name, "not measured", "BN@32, BN@2 or BRN@2 did not run")
    loss, gain = compare(runs["BN@2"], runs["BN@32"]), compare(runs["BN@2"], runs["BRN@2"])
    bn32, bn2, brn2 = (_mean(runs[key]) for key in ("BN@32", "BN@2", "BRN@2"))
    evidence = f"BN@2 {bn2:.2f} - BRN@2 {brn2:.2f} top-1 err = {_said(gain)}; BN@32 {bn32:.2f}"
    if not (loss["judged"] and gain["judged"]):
        return _claim(name, ONE_SEED, evidence, gain)
    if not (loss["counts"] and loss["difference"] > 0):
        return _claim(name, "not reproduced (BN@2 did not degrade by more than the rule allows: nothing to recover)",
                      evidence, gain)
    if not (gain["counts"] and gain["difference"] > 0):
        return _claim(name, "not reproduced", evidence, gain)
    evidence += f"; BRN recovers {100 * (bn2 - brn2) / (bn2 - bn32):.0f}% of the BN@2 - BN@32 gap"
    rest = compare(runs["BRN@2"], runs["BN@32"])
    verdict = "reproduced" if rest["counts"] and rest["difference"] > 0 else \
        "reproduced (all of it: BRN@2 and BN@32 do not differ by the rule, more than the paper's partial recovery)"
    return _claim(name, verdict, evidence, gain)


def _matches(runs: Mapping[str, Sequence[float]]) -> Dict[str, object]:
    name = "MABN@2 matches BN@32"
    if not runs.get("BN@32") or not runs.get("MABN@2"):
        return _claim(name, "not measured", "BN@32 or MABN@2 did not run")
    c = compare(runs["MABN@2"], runs["BN@32"])
    evidence = f"MABN@2 {_mean(runs['MABN@2']):.2f} - BN@32 {_mean(runs['BN@32']):.2f} top-1 err = {_said(c)}"
    if not c["judged"]:
        return _claim(name, ONE_SEED, evidence, c)
    if not c["counts"]:
        reach = abs(c["difference"]) + SE_MULTIPLE * c["se"]
        if reach <= EQUIVALENCE_POINTS:
            return _claim(name, f"reproduced (within {EQUIVALENCE_POINTS:g} points at {SE_MULTIPLE:g} SE)", evidence, c)
        return _claim(name, f"inconclusive (the difference does not count, but the seeds' spread allows one of up to "
                            f"{reach:.1f} points)", evidence, c)
    side = "better" if c["difference"] < 0 else "worse"
    return _claim(name, f"not reproduced (MABN@2 is {side} than BN@32 by more than the rule allows)", evidence, c)


def speed_comparison(bn_folded_ms: Sequence[float], mabn_folded_ms: Sequence[float]) -> Dict[str, object]:
    """Per-round speed ratios of folded MABN to folded BN (BN's time / MABN's: above 1, MABN is faster):
    their median, quartiles and whether the median is within the interquartile range of 1."""
    ratios = [bn / mabn for bn, mabn in zip(bn_folded_ms, mabn_folded_ms)]
    result: Dict[str, object] = {"rounds": len(ratios), "median": statistics.median(ratios), "q1": None, "q3": None,
                                 "tolerance": None, "judged": len(ratios) >= MIN_SPEED_ROUNDS, "within": None}
    if result["judged"]:
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        result.update(q1=q1, q3=q3, tolerance=q3 - q1, within=abs(result["median"] - 1.0) <= q3 - q1)
    return result


def _costs_nothing(speed: Optional[Dict[str, object]]) -> Dict[str, object]:
    name = "MABN costs nothing at inference (folded into the convs like BN)"
    if speed is None:
        return _claim(name, "not measured", "the inference benchmark did not run")
    evidence = f"Folded MABN runs at {speed['median']:.3f}x folded BN's speed (median of {speed['rounds']} rounds"
    if not speed["judged"]:
        return _claim(name, f"fewer than {MIN_SPEED_ROUNDS} rounds: not judged", evidence + ")", speed)
    evidence += f"; tolerance = interquartile range of the per-round ratios, {speed['tolerance']:.3f})"
    return _claim(name, "reproduced" if speed["within"] else "not reproduced", evidence, speed)


def _detection(box_ap: Mapping[str, Sequence[float]], seeds: Sequence[int]) -> Dict[str, object]:
    name = "MABN@2 beats BN@2 in detection (box AP, trained from scratch)"
    if not box_ap.get("bn") or not box_ap.get("mabn"):
        return _claim(name, "not measured", "detection BN@2 or MABN@2 has no result")
    c = compare(box_ap["mabn"], box_ap["bn"])
    evidence = (f"MABN@2 {_mean(box_ap['mabn']):.2f} - BN@2 {_mean(box_ap['bn']):.2f} box AP = {_said(c)}, seeds "
                f"{', '.join(map(str, seeds))}")
    if not c["judged"]:
        return _claim(name, ONE_SEED, evidence, c)
    return _claim(name, "reproduced" if c["counts"] and c["difference"] > 0 else "not reproduced", evidence, c)


def check_claims(top1: Mapping[str, Sequence[float]], speed: Optional[Dict[str, object]] = None,
                 det_box_ap: Optional[Mapping[str, Sequence[float]]] = None,
                 det_seeds: Sequence[int] = ()) -> List[Dict[str, object]]:
    """Verdicts for the claims: ``top1`` maps row keys (``BN@32``, ...) to the top-1 error of each seed,
    ``speed`` is :func:`speed_comparison`'s result, ``det_box_ap`` maps det norms to each seed's box AP
    (None: detection did not run, no claim)."""
    claims = [_degrades(top1), _recovers(top1), _matches(top1), _costs_nothing(speed)]
    if det_box_ap is not None:
        claims.append(_detection(det_box_ap, det_seeds))
    return claims
