"""The Datorus gateway without its Metering addon, for ``scripts/bench`` only.

``mitmdump -s scripts/bench_no_metering.py`` loads the same addon suite as
``addons/datorus.py`` minus ``Metering`` (admission by balance, byte counting, usage
writes): the reference the benchmark measures metering's cost against. Not a product
setting: a gateway must never run unmetered.
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from addons import datorus  # noqa: E402
from addons.metering import Metering  # noqa: E402

addons = [a for a in datorus.addons if not isinstance(a, Metering)]
