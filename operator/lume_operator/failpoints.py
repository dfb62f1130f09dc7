"""Named points where a test can make the operator die, as a pod killed at the worst moment.

`LUME_OPERATOR_FAILPOINT=<name>` makes `hit(<name>)` end the process at once (no cleanup, no
status patch), so restart tests can prove that nothing runs twice. Unset, it does nothing.
"""

from __future__ import annotations

import os

ENV = "LUME_OPERATOR_FAILPOINT"


def hit(name: str) -> None:
    if os.environ.get(ENV) == name:
        os._exit(137)
