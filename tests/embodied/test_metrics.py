"""Rates and Wilson intervals."""

import math

import pytest

from embodied.metrics import Rate, rate, wilson


def test_wilson_matches_known_values():
    # Wilson 95% interval for 8/10 (textbook value: 0.490 .. 0.943)
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    lo, hi = wilson(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-3)
    lo, hi = wilson(20, 20)
    assert hi == 1.0 and lo == pytest.approx(0.8389, abs=1e-3)


def test_wilson_rejects_impossible_counts_and_handles_empty():
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson(5, 3)
    assert all(math.isnan(x) for x in wilson(0, 0))
    assert str(Rate(0, 0)) == "n/a (n=0)"


def test_rate_over_records_filters_then_counts():
    records = [{"set": "a", "ok": True}, {"set": "a", "ok": False}, {"set": "b", "ok": True}]
    r = rate(records, lambda r: r["ok"], lambda r: r["set"] == "a")
    assert (r.k, r.n, r.value) == (1, 2, 0.5)
    d = r.to_dict()
    assert d["low"] < 0.5 < d["high"] and d["k"] == 1
