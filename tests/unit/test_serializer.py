"""lume-json: what a flow's return value becomes, and that storing it imports nothing new."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lume_operator.prefect.serializer import LumeJSONSerializer, loads

pytestmark = pytest.mark.unit


def test_numpy_values_and_unencodable_ones_are_marked():
    import numpy as np

    value = {"a": np.arange(3, dtype="int16"), "b": [np.float32(1.5), {1, 2}], "c": None}
    stored = LumeJSONSerializer().dumps(value)
    back = loads(stored)
    assert back["a"].dtype == np.int16 and back["a"].tolist() == [0, 1, 2]
    assert back["b"][0] == np.float32(1.5) and isinstance(back["b"][0], np.float32)
    assert back["b"][1] == {"__lume__": "unencodable", "path": "b.1", "type": "set"}
    assert back["c"] is None


def test_storing_a_flow_result_does_not_import_numpy():
    """A flow that never imported numpy must not pay its import to store a dict (each warm
    flow-run process did, 0.1 CPU-s); a set is still named as unencodable."""
    code = (
        "import sys\n"
        "from lume_operator.prefect.serializer import LumeJSONSerializer\n"
        "assert 'numpy' not in sys.modules, 'imported before the test'\n"
        "print(LumeJSONSerializer().dumps({'slept': 2.0, 'seen': {1}}).decode())\n"
        "print('numpy' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == [
        '{"slept": 2.0, "seen": {"__lume__": "unencodable", "path": "seen", "type": "set"}}',
        "False",
    ]
