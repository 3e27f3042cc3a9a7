"""Verdicts score closeness to the data over seeds (fullrange.reproduce.verdicts), and the colour-cast metric."""

import pytest

from fullrange.reproduce.verdicts import closer, fmt, holds, interval, spread_distance


def test_over_dispersion_is_not_a_win():
    """The report's old rule called trailing steps a win because their spread (1.075) beat leading's (0.938) by
    more than 0.1; 0.938 is the closer of the two to the data's 1.0."""
    trailing, leading = 1.075, 0.938  # the old rule rewarded trailing's spread for beating leading's by more than 0.1
    assert closer([spread_distance(trailing)], [spread_distance(leading)]) == "not reproduced"
    assert closer([spread_distance(leading)], [spread_distance(trailing)]) == "partly"  # closer, not by 25%


def test_closer_needs_every_seed_and_a_clear_margin():
    assert closer([0.05, 0.06, 0.04], [0.10, 0.12, 0.09]) == "reproduced"
    assert closer([0.05, 0.06, 0.11], [0.10, 0.12, 0.09]) == "partly"  # worse in one seed
    assert closer([0.09, 0.10, 0.08], [0.10, 0.12, 0.09]) == "partly"  # every seed, but only 15% closer
    assert closer([0.10, 0.12, 0.09], [0.05, 0.06, 0.04]) == "not reproduced"
    with pytest.raises(ValueError, match="differ in length"):
        closer([0.1, 0.2], [0.1, 0.2, 0.3])


def test_holds_counts_seeds():
    assert holds([True, True, True]) == "reproduced"
    assert holds([True, False, True]) == "partly"
    assert holds([False, False, False]) == "not reproduced"
    assert holds([False, False, False], on_average=True) == "partly"


def test_interval_and_its_text():
    cell = interval([0.5, 0.7, 0.6])
    assert cell == {"mean": pytest.approx(0.6), "low": 0.5, "high": 0.7, "values": [0.5, 0.7, 0.6]}
    assert fmt([0.5, 0.7, 0.6]) == "0.600 (0.500–0.700)"
    assert fmt([0.25]) == "0.250"
