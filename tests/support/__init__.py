"""Test support: a real gateway process, real origins on loopback, the real CLI.

Nothing here patches Datorus: the gateway is ``mitmdump -s addons/datorus.py`` in a
subprocess, the ledger is a real SQLite file (or, with ``DATORUS_TEST_LEDGER=postgresql``,
a database of a real PostgreSQL the tests start), the CLI is the installed ``datorus``.
Helpers wait on readiness probes, never on fixed sleeps. One module per concern:

- ``paths``: the repository and the installed commands;
- ``waiting``: free ports and bounded waits (``wait_until``, ``wait_http``);
- ``clients``: the raw client side (``basic``, ``raw_connection``, ``read_response``);
- ``ledger``: a test's ledger, a file or a URL (``new_ledger``), the ``datorus`` CLI on
  it (``cli``, ``prepare_ledger``, ``add_egress``) and direct reads and writes
  (``ledger_rows``, ``ledger_row``, ``ledger_value``, ``ledger_exec``);
- ``postgres``: a real PostgreSQL cluster of the tests' own (``shared_cluster``);
- ``processes``: the gateway (``Gateway``, ``GatewaySetup``, ``start_gateway``) and a
  standalone ``datorus api`` (``ApiProcess``);
- ``origins``: HTTP origins (``Origin``, ``BlockingOrigin``);
- ``counting``: byte-counting servers for metering (``RawOrigin``, ``CountingRelay``);
- ``upstream``: an upstream CONNECT proxy for the egress pool (``UpstreamProxy``).
- ``serve``: a ``datorus serve`` and which worker holds a connection (``Serve``,
  ``owner_pid``);
- ``redis_server``: a real ``redis-server`` on a free loopback port (``RedisServer``).
- ``redis_worker``: a script holding one worker's Redis hot state, for tests that
  ``kill -9`` a worker.

The fixtures built on them (``gw``, ``gateway``, ``origin``...) live in ``conftest.py``.
"""
