"""The ledger: every SQL statement Datorus runs, and nothing else.

One SQLite file (a public interface: open it with ``sqlite3``, ``sqlite-utils`` or
``datasette``), or one PostgreSQL database that several gateways share, read and
written only through this package:

``schema``, ``schema_postgres``
    the numbered, idempotent migrations (the tables, triggers and views), one list
    per backend with the same numbers;
``dialect``
    the seam between the portable SQL written here and the database running it;
``target``
    a ledger's location: a SQLite path or a ``postgresql://`` URL (shown without
    its password);
``db``
    opening the ledger, and :class:`Ledger`, the synchronous handle (one DB-API
    connection) that the CLI, the REST API and tools use;
``postgres``, ``errors``
    the PostgreSQL driver (psycopg 3, loaded only for a PostgreSQL ledger), and the
    error classes both backends raise;
``accounts``
    accounts and their proxy credentials;
``money``
    top-ups, corrections, trial grants, card payments and the transaction history;
``usage``
    usage totals and receipts;
``policy_rules``
    the operator's allow and deny rules;
``allowed_ips``
    allow-listed client addresses of proxy credentials;
``egress``, ``leases``
    the egress pool and exclusive leases on it;
``sources``
    proxy-list sources, the claims that run each scrape once, and the proxies they found;
``gateway``
    :class:`~.gateway.LedgerLink`, the gateway's asynchronous connection (aiosqlite,
    or psycopg's asyncio side): snapshots in, usage batches out, each batch once.

One connection discipline per process: the gateway's event loop reaches the ledger
only through ``LedgerLink``; the CLI, the API's worker threads and the scripts use a
:class:`Ledger`.
"""

from __future__ import annotations

from .db import DatabaseError, IntegrityError, Ledger, connect, open_ledger

__all__ = ["DatabaseError", "IntegrityError", "Ledger", "connect", "open_ledger"]
