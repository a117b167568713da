"""Run localstripe (a fake Stripe API, from PyPI) on 127.0.0.1:PORT for the tests.

Its own launcher listens on every interface and pickles its store to /tmp on every
write; the tests need neither, so this one binds loopback and keeps state in memory.
"""

from __future__ import annotations

import sys

from aiohttp import web
from localstripe import resources
from localstripe.server import app

resources.Store.dump_to_disk = lambda self: None  # type: ignore[method-assign]

if __name__ == "__main__":
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
