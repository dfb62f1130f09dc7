"""The flow-run process of local runs: Prefect's engine, with the `lume-json` serializer known.

The local runner's work pool runs `python -m lume_operator.local.engine` instead of
`python -m prefect.engine`, so return values are stored as lume-operator's JSON (numpy arrays
and scalars included); a deployment pull step would not do, as Prefect may run those steps in
another process.
"""

from __future__ import annotations

import runpy

import lume_operator.prefect.serializer  # noqa: F401  (registers the `lume-json` type)

if __name__ == "__main__":
    runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)
