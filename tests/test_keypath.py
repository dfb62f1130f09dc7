"""The one walk into stored values: every reader resolves and refuses a path the same way."""

from __future__ import annotations

import pytest

from lume_operator.api.keypath import KeyPathError, split, walk

pytestmark = pytest.mark.unit

VALUE = {"stats": {"mean": [1.5, 2.5]}, "n": 3, "0": "zero"}


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ([], VALUE),
        (["stats", "mean", 0], 1.5),
        (["stats", "mean", "1"], 2.5),
        (["stats", "mean", -1], 2.5),
        ([0], "zero"),  # an int finds a dict entry by its string form
        (split("stats.mean.1"), 2.5),
        (split("return"), VALUE),
    ],
)
def test_a_path_resolves(keys, expected):
    assert walk(VALUE, keys) == expected


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["median"], "['median']: no key 'median' (has 'stats', 'n', '0')"),
        (
            ["stats", "mean", 5],
            "['stats']['mean'][5]: index 5 is out of range (the list has 2 items)",
        ),
        (
            ["stats", "mean", "x"],
            "['stats']['mean']['x']: 'x' indexes a list, which needs a number",
        ),
        (["n", "x"], "['n']['x']: cannot index a int"),
        (["stats", "mean", True], "indexes a list, which needs a number"),
    ],
)
def test_a_path_that_does_not_resolve_says_where_and_what_is_there(keys, message):
    with pytest.raises(KeyPathError) as raised:
        walk(VALUE, keys)
    assert message in str(raised.value)
