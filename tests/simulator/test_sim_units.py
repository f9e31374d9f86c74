from __future__ import annotations

import pytest

from simulator import units


def test_parse_units() -> None:
    assert units.parse_duration("250ms") == 0.25
    assert units.parse_duration("-2h") == -7200
    assert units.parse_duration(3) == 3.0
    assert units.parse_size("2MiB") == 2 * 1024 * 1024
    assert units.parse_size("1MB") == 1_000_000
    assert units.parse_rate("256kbit") == 256_000
    assert units.parse_rate("20Mbit/s") == 20_000_000


@pytest.mark.parametrize("bad", ["fast", "10 parsecs", True, None, [], "-1MiB"])
def test_bad_sizes_are_refused(bad: object) -> None:
    with pytest.raises(units.UnitError):
        units.parse_size(bad)


def test_rate_must_be_positive() -> None:
    with pytest.raises(units.UnitError):
        units.parse_rate("0kbit")
