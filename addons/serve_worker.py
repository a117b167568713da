"""One ``datorus serve`` worker: ``mitmdump`` with the shared-port patch in place first.

``datorus serve`` runs ``python addons/serve_worker.py -s addons/datorus.py ARGS...``:
exactly mitmdump's own entry point (the same arguments, the same addon suite, loaded
by mitmdump itself), after :func:`addons.patches.share_listening_sockets`, which must
come before mitmproxy opens its listening sockets. The worker also dies with its
launcher (``PR_SET_PDEATHSIG``), so a launcher killed with SIGKILL leaves no worker
holding the port.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

_PR_SET_PDEATHSIG = 1


def die_with_launcher() -> None:
    """Have the kernel send SIGTERM when the launcher goes; exit now if it is gone already."""
    from datorus_core.workers import LAUNCHER_ENV

    launcher = os.environ.get(LAUNCHER_ENV)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if launcher and os.getppid() != int(launcher):
        sys.exit("datorus: worker: its launcher is gone")


def main() -> None:
    """Run mitmdump with ``sys.argv``'s arguments, patched to share its ports."""
    die_with_launcher()
    from addons import patches

    patches.share_listening_sockets()
    from mitmproxy.tools.main import mitmdump

    sys.argv[0] = "mitmdump"
    mitmdump()


if __name__ == "__main__":
    main()
