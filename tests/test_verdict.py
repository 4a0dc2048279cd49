"""Verdicts and threshold calibration (inspector.verdict)."""

from __future__ import annotations

import math

import pytest

from inspector.verdict import Thresholds, Verdict, calibrate


def test_decide_boundaries():
    t = Thresholds(1.0, 2.0)
    assert t.decide(0.999) is Verdict.OK
    assert t.decide(1.0) is Verdict.UNCERTAIN  # ok_below is exclusive
    assert t.decide(1.999) is Verdict.UNCERTAIN
    assert t.decide(2.0) is Verdict.NG  # ng_above is inclusive
    assert t.decide(math.nan) is Verdict.UNCERTAIN  # never OK by accident
    assert Thresholds(1.0, 1.0).decide(1.0) is Verdict.NG  # no uncertain band
    assert Verdict.NG == "NG" and f"{Verdict.OK}" == "OK"


def test_thresholds_validate_and_round_trip():
    with pytest.raises(ValueError, match="must not exceed"):
        Thresholds(2.0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        Thresholds(math.inf, 1.0)
    t = Thresholds(0.25, 0.5)
    assert Thresholds.from_dict(t.to_dict()) == t


def test_calibrate_without_defects_uses_normal_spread():
    normal = [1.0, 1.1, 1.2, 0.9]
    t = calibrate(normal)
    std = float(__import__("numpy").std(normal))
    assert t.ok_below == pytest.approx(1.2 + std)
    assert t.ng_above == pytest.approx(1.2 + 3 * std)
    assert all(t.decide(s) is Verdict.OK for s in normal)


def test_calibrate_separable_defects():
    normal = [1.0, 1.1, 1.2]
    defects = [3.0, 3.5, 4.0, 5.0]
    t = calibrate(normal, defects)
    assert all(t.decide(s) is Verdict.OK for s in normal)
    assert all(t.decide(s) is Verdict.NG for s in defects)
    assert t.ok_below <= (1.2 + 3.0 + 0.1) / 2  # never past the midpoint to the weakest defects
    assert t.ok_below <= t.ng_above


def test_calibrate_overlap_makes_the_overlap_uncertain():
    normal = [1.0, 1.1, 2.0]
    defects = [1.5, 1.6, 1.7, 3.2, 3.4, 3.6, 3.8, 4.0, 4.2, 4.4]
    t = calibrate(normal, defects)
    lo = float(__import__("numpy").quantile(defects, 0.1))
    assert t.ok_below == pytest.approx(lo)
    assert t.decide(2.0) is Verdict.UNCERTAIN  # the normal that looks like a defect goes to review
    assert t.decide(1.0) is Verdict.OK


def test_calibrate_single_shot_has_a_margin():
    t = calibrate([0.5])
    assert t.ok_below > 0.5 and t.ng_above > t.ok_below
    with pytest.raises(ValueError):
        calibrate([])
