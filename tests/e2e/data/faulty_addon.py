"""A test script: an addon guarded like Datorus's whose ``running`` raises.

Loaded by ``mitmdump -s`` in tests/e2e/test_startup.py to prove that any exception
in a guarded lifecycle hook stops the process instead of leaving an open proxy.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))))

from addons.failclosed import guard  # noqa: E402


class Boom:
    name = "boom"

    def running(self) -> None:
        raise RuntimeError("boom in running")


addons = guard([Boom()])
