"""Where the repository and the installed commands are (``mitmdump``, ``datorus``)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
BIN = Path(sys.executable).parent
MITMDUMP = str(BIN / "mitmdump")
DATORUS = str(BIN / "datorus")
