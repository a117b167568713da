"""The ledger's schema as numbered, idempotent migrations.

The SQLite file is a public interface: an operator can open it with
``sqlite-utils`` or ``datasette``. ``transactions`` is the append-only truth for
money and trial bytes; ``balances`` is a cache of its sums kept by a trigger in the
same transaction as every insert, so the two can never disagree.

Money is stored in *nanocents* (10^9 nanocents = 1 cent). A price of P cents per
GB (10^9 bytes) is exactly P nanocents per byte, so every charge is an integer
and a million 1-byte charges cost what one million-byte charge costs.

The migrations are SQLite's own DDL (triggers, partial indexes, ``WITHOUT ROWID``):
PostgreSQL has its own list with the same numbers (:mod:`.schema_postgres`), while the
queries in the other modules of this package stay shared (see :mod:`.dialect`). A
migration added here is added there too.
"""

from __future__ import annotations

import sqlite3

_TOUCH = "UPDATE config_version SET version = version + 1 WHERE id = 1"

MIGRATIONS: tuple[str, ...] = (
    # 1: accounts, credentials, money, usage, receipts, policy
    f"""
    CREATE TABLE accounts (
        id INTEGER PRIMARY KEY,
        email TEXT NOT NULL UNIQUE COLLATE NOCASE,
        status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
        provider TEXT,
        price_cents_per_gb INTEGER,
        rps INTEGER,
        burst INTEGER,
        max_tunnels INTEGER,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
    );
    CREATE TABLE credentials (
        id INTEGER PRIMARY KEY,
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        username TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        max_bytes INTEGER,
        label TEXT,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
        revoked_at TEXT
    );
    CREATE INDEX credentials_account ON credentials(account_id);
    CREATE TABLE transactions (
        id INTEGER PRIMARY KEY,
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        kind TEXT NOT NULL CHECK (kind IN ('trial_grant', 'topup', 'usage', 'adjustment')),
        nanocents INTEGER NOT NULL DEFAULT 0,
        trial_bytes INTEGER NOT NULL DEFAULT 0,
        bytes INTEGER NOT NULL DEFAULT 0,
        requests INTEGER NOT NULL DEFAULT 0,
        reason TEXT,
        external_id TEXT UNIQUE,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
    );
    CREATE INDEX transactions_account ON transactions(account_id, id);
    CREATE TABLE balances (
        account_id INTEGER PRIMARY KEY REFERENCES accounts(id),
        nanocents INTEGER NOT NULL DEFAULT 0,
        trial_bytes INTEGER NOT NULL DEFAULT 0,
        used_bytes INTEGER NOT NULL DEFAULT 0,
        requests INTEGER NOT NULL DEFAULT 0,
        charged_nanocents INTEGER NOT NULL DEFAULT 0,
        topped_up INTEGER NOT NULL DEFAULT 0
    );
    CREATE TRIGGER transactions_append_only_u BEFORE UPDATE ON transactions
        BEGIN SELECT RAISE(ABORT, 'transactions are append-only'); END;
    CREATE TRIGGER transactions_append_only_d BEFORE DELETE ON transactions
        BEGIN SELECT RAISE(ABORT, 'transactions are append-only'); END;
    CREATE TRIGGER transactions_balance AFTER INSERT ON transactions BEGIN
        INSERT INTO balances (account_id) VALUES (NEW.account_id)
            ON CONFLICT (account_id) DO NOTHING;
        UPDATE balances SET
            nanocents = nanocents + NEW.nanocents,
            trial_bytes = trial_bytes + NEW.trial_bytes,
            used_bytes = used_bytes + CASE WHEN NEW.kind = 'usage' THEN NEW.bytes ELSE 0 END,
            requests = requests + CASE WHEN NEW.kind = 'usage' THEN NEW.requests ELSE 0 END,
            charged_nanocents = charged_nanocents
                - CASE WHEN NEW.kind = 'usage' THEN NEW.nanocents ELSE 0 END,
            topped_up = topped_up OR NEW.kind = 'topup'
        WHERE account_id = NEW.account_id;
    END;
    CREATE TABLE usage_daily (
        account_id INTEGER NOT NULL,
        credential_id INTEGER NOT NULL,
        day TEXT NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        bytes_up INTEGER NOT NULL DEFAULT 0,
        bytes_down INTEGER NOT NULL DEFAULT 0,
        trial_bytes INTEGER NOT NULL DEFAULT 0,
        nanocents INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (account_id, credential_id, day)
    );
    CREATE TABLE credential_usage (
        credential_id INTEGER PRIMARY KEY,
        bytes INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE receipts (
        request_id TEXT PRIMARY KEY,
        account_id INTEGER NOT NULL,
        credential_id INTEGER NOT NULL,
        method TEXT NOT NULL,
        host TEXT NOT NULL,
        port INTEGER NOT NULL,
        status INTEGER NOT NULL,
        bytes_up INTEGER NOT NULL,
        bytes_down INTEGER NOT NULL,
        trial_bytes INTEGER NOT NULL,
        nanocents INTEGER NOT NULL,
        started_at TEXT NOT NULL,
        finished_at TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX receipts_account ON receipts(account_id, request_id);
    CREATE TABLE policy_rules (
        id INTEGER PRIMARY KEY,
        action TEXT NOT NULL CHECK (action IN ('allow', 'deny')),
        target TEXT NOT NULL,
        port INTEGER,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
        UNIQUE (action, target, port)
    );
    CREATE TABLE aup_denials (
        id INTEGER PRIMARY KEY,
        account_id INTEGER,
        host TEXT NOT NULL,
        port INTEGER NOT NULL,
        rule TEXT NOT NULL,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
    );
    CREATE TABLE config_version (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL
    );
    INSERT INTO config_version (id, version) VALUES (1, 1);
    CREATE TRIGGER accounts_touch_i AFTER INSERT ON accounts BEGIN {_TOUCH}; END;
    CREATE TRIGGER accounts_touch_u AFTER UPDATE ON accounts BEGIN {_TOUCH}; END;
    CREATE TRIGGER credentials_touch_i AFTER INSERT ON credentials BEGIN {_TOUCH}; END;
    CREATE TRIGGER credentials_touch_u AFTER UPDATE ON credentials BEGIN {_TOUCH}; END;
    CREATE TRIGGER policy_touch_i AFTER INSERT ON policy_rules BEGIN {_TOUCH}; END;
    CREATE TRIGGER policy_touch_d AFTER DELETE ON policy_rules BEGIN {_TOUCH}; END;
    CREATE TRIGGER money_touch AFTER INSERT ON transactions WHEN NEW.kind != 'usage'
        BEGIN {_TOUCH}; END;
    CREATE VIEW account_overview AS
        SELECT a.id, a.email, a.status,
               COALESCE(b.trial_bytes, 0) AS trial_remaining_bytes,
               COALESCE(b.nanocents, 0) AS balance_nanocents,
               COALESCE(b.used_bytes, 0) AS used_bytes,
               COALESCE(b.requests, 0) AS requests,
               COALESCE(b.charged_nanocents, 0) AS charged_nanocents,
               COALESCE(b.topped_up, 0) AS topped_up
        FROM accounts a LEFT JOIN balances b ON b.account_id = a.id;
    """,
    # 2: the customer API (issue 6): API keys, sign-up tokens, mail outbox, Stripe events
    """
    ALTER TABLE accounts ADD COLUMN display_name TEXT;
    ALTER TABLE accounts ADD COLUMN verified_at TEXT;
    ALTER TABLE accounts ADD COLUMN stripe_customer_id TEXT;
    ALTER TABLE accounts ADD COLUMN stripe_payment_method TEXT;
    CREATE TABLE api_keys (
        id INTEGER PRIMARY KEY,
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        prefix TEXT NOT NULL,
        key_hash TEXT NOT NULL UNIQUE,
        label TEXT,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
        last_used_at TEXT,
        revoked_at TEXT
    );
    CREATE INDEX api_keys_account ON api_keys(account_id, id);
    CREATE TABLE email_tokens (
        id INTEGER PRIMARY KEY,
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        purpose TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
        used_at TEXT
    );
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        recipient TEXT NOT NULL,
        subject TEXT NOT NULL,
        body TEXT NOT NULL,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
        sent_at TEXT,
        error TEXT
    );
    CREATE TABLE stripe_events (
        id TEXT PRIMARY KEY,
        type TEXT NOT NULL,
        account_id INTEGER,
        external_id TEXT,
        received_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
    );
    CREATE TABLE api_secrets (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE idempotency (
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        key TEXT NOT NULL,
        response TEXT NOT NULL,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
        PRIMARY KEY (account_id, key)
    );
    """,
    # 3: the egress pool (issue 5)
    f"""
    CREATE TABLE egress (
        id INTEGER PRIMARY KEY,
        url TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        country TEXT,
        weight INTEGER NOT NULL DEFAULT 1 CHECK (weight > 0),
        enabled INTEGER NOT NULL DEFAULT 1,
        score REAL NOT NULL DEFAULT 0.5,
        uptime_pct REAL,
        avg_latency_ms REAL,
        exit_ip TEXT,
        anonymity TEXT,
        last_checked_at TEXT,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
    );
    CREATE TABLE egress_checks (
        id INTEGER PRIMARY KEY,
        egress_id INTEGER NOT NULL REFERENCES egress(id) ON DELETE CASCADE,
        checker_name TEXT NOT NULL,
        stage INTEGER NOT NULL,
        passed INTEGER NOT NULL,
        latency_ms REAL,
        exit_ip TEXT,
        detail TEXT,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
    );
    CREATE INDEX egress_checks_egress ON egress_checks(egress_id, id);
    CREATE TRIGGER egress_touch_i AFTER INSERT ON egress BEGIN {_TOUCH}; END;
    CREATE TRIGGER egress_touch_u AFTER UPDATE OF url, kind, country, weight, enabled ON egress
        BEGIN {_TOUCH}; END;
    CREATE TRIGGER egress_touch_d AFTER DELETE ON egress BEGIN {_TOUCH}; END;
    """,
    # 4: exclusive egress leases (seed 002's acquire/release); expires_at in Unix seconds
    f"""
    CREATE TABLE leases (
        id TEXT PRIMARY KEY,
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        egress_id INTEGER NOT NULL REFERENCES egress(id) ON DELETE CASCADE,
        cents INTEGER NOT NULL,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
        expires_at INTEGER NOT NULL,
        released_at TEXT
    );
    CREATE INDEX leases_live ON leases(expires_at) WHERE released_at IS NULL;
    CREATE INDEX leases_account ON leases(account_id, expires_at);
    CREATE TRIGGER leases_touch_i AFTER INSERT ON leases BEGIN {_TOUCH}; END;
    CREATE TRIGGER leases_touch_u AFTER UPDATE ON leases BEGIN {_TOUCH}; END;
    """,
    # 5: /account/credits rolls usage up per day: find money rows and usage days by index
    """
    CREATE INDEX transactions_money ON transactions(account_id, id) WHERE kind != 'usage';
    CREATE INDEX transactions_usage_time ON transactions(account_id, created_at)
        WHERE kind = 'usage';
    """,
    # 6: the bytes each gateway worker has flushed, per credential, written in the same
    # transaction as its usage: with the hot state in Redis, a worker's byte credit is
    # what it claimed less what the ledger already holds of it (issue 15). One row per
    # worker incarnation and credential, deleted once that worker is gone.
    """
    CREATE TABLE worker_usage (
        worker TEXT NOT NULL,
        credential_id INTEGER NOT NULL,
        account_id INTEGER NOT NULL,
        bytes INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (worker, credential_id)
    );
    """,
    # 7: of those bytes, the trial bytes: workers claim trial credit apart from byte
    # credit (a worker charges as trial only the trial it holds), so the ledger keeps
    # what each one flushed of it too, in the same transaction as its usage
    """
    ALTER TABLE worker_usage ADD COLUMN trial_bytes INTEGER NOT NULL DEFAULT 0;
    """,
    # 8: every usage batch the gateway wrote, by its id, in the same transaction as its
    # usage: a batch whose write committed but whose answer was lost (the connection
    # broke at the commit) is recognised when it is written again, and skipped (issue
    # 16: a batch is written once). Rows older than a week are pruned with the receipts.
    # And an index for finding an account by its email in any case, the way PostgreSQL
    # finds it (lower(email) = lower(?) in both).
    """
    CREATE TABLE usage_batches (
        id TEXT PRIMARY KEY,
        worker TEXT,
        written_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX usage_batches_written ON usage_batches(written_at);
    CREATE INDEX accounts_email_lower ON accounts(lower(email));
    """,
    # 9: operator keys and proxy-list sources (issue 17). An operator key is an API key
    # of no account (operator = 1, account_id NULL): SQLite cannot drop a NOT NULL, so
    # api_keys is rebuilt with its rows and ids. A source is a list URL scraped on
    # request or on its cron schedule; next_run_at and claim_until are Unix seconds
    # (compared, never shown raw), and a process runs a scrape only while it holds the
    # claim (claimed_by, until claim_until), so one scheduled run happens once among
    # every gateway on the ledger. egress.source_id names the source that found a proxy
    # (a plain column: deleting a source keeps its proxies and this trace of it);
    # egress.tags is a JSON object of the source's tags.
    """
    CREATE TABLE api_keys_v9 (
        id INTEGER PRIMARY KEY,
        account_id INTEGER REFERENCES accounts(id),
        prefix TEXT NOT NULL,
        key_hash TEXT NOT NULL UNIQUE,
        label TEXT,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
        last_used_at TEXT,
        revoked_at TEXT,
        operator INTEGER NOT NULL DEFAULT 0 CHECK (operator IN (0, 1)),
        CHECK ((operator = 1) = (account_id IS NULL))
    );
    INSERT INTO api_keys_v9 (id, account_id, prefix, key_hash, label, created_at,
                             last_used_at, revoked_at)
        SELECT id, account_id, prefix, key_hash, label, created_at, last_used_at, revoked_at
        FROM api_keys;
    DROP TABLE api_keys;
    ALTER TABLE api_keys_v9 RENAME TO api_keys;
    CREATE INDEX api_keys_account ON api_keys(account_id, id);
    CREATE TABLE sources (
        id INTEGER PRIMARY KEY,
        name TEXT,
        url TEXT NOT NULL,
        parser_name TEXT,
        cron_schedule TEXT,
        default_protocol TEXT NOT NULL DEFAULT 'http'
            CHECK (default_protocol IN ('http', 'https', 'socks4', 'socks5')),
        default_country TEXT,
        default_weight INTEGER NOT NULL DEFAULT 1 CHECK (default_weight > 0),
        tags TEXT NOT NULL DEFAULT '{}',
        enabled INTEGER NOT NULL DEFAULT 1,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
        updated_at TEXT,
        last_scraped_at TEXT,
        last_error TEXT,
        last_found INTEGER,
        last_new INTEGER,
        last_duration_ms INTEGER,
        next_run_at INTEGER,
        claimed_by TEXT,
        claim_until INTEGER
    );
    CREATE INDEX sources_due ON sources(next_run_at) WHERE enabled = 1;
    ALTER TABLE egress ADD COLUMN source_id INTEGER;
    ALTER TABLE egress ADD COLUMN tags TEXT;
    CREATE INDEX egress_source ON egress(source_id);
    """,
    # 10 (checkers): each egress's status as its checks left it, unchecked until they
    # pass, active, or dead after egress_dead_after failures in a row (fail_streak); the
    # existing ones get what the pool API showed them as; found_country, the exit's country
    # the checks found (routing uses it where the operator or source gave none; no
    # config_version touch, each gateway fills it as it checks). checker_runs: each checker
    # plugin's health (runs, failures, the last of each, errors it raised), written with
    # each check. Status changes are no operator change: no config_version touch.
    """
    ALTER TABLE egress ADD COLUMN status TEXT NOT NULL DEFAULT 'unchecked'
        CHECK (status IN ('unchecked', 'active', 'dead'));
    ALTER TABLE egress ADD COLUMN found_country TEXT;
    ALTER TABLE egress ADD COLUMN fail_streak INTEGER NOT NULL DEFAULT 0;
    UPDATE egress SET status = CASE
        WHEN last_checked_at IS NULL THEN 'unchecked' WHEN score > 0 THEN 'active' ELSE 'dead'
    END;
    CREATE INDEX egress_status ON egress(status);
    CREATE TABLE checker_runs (
        name TEXT PRIMARY KEY,
        runs INTEGER NOT NULL DEFAULT 0,
        failures INTEGER NOT NULL DEFAULT 0,
        errors INTEGER NOT NULL DEFAULT 0,
        last_run_at TEXT,
        last_failure_at TEXT,
        last_failure TEXT,
        last_error_at TEXT,
        last_error TEXT
    );
    """,
    # 11: events (issue 18). One log of named events, ids in commit order (AUTOINCREMENT:
    # never reused, even once the newest rows are pruned), written in the same transaction
    # as the change each describes; dedupe names an event that happens once (the first
    # refusal for money since the last top-up, a pool crossing its low mark), so every
    # gateway may try to write it. Subscriptions are the operator's notifiers (account_id
    # NULL) and the customers' webhooks; the signing secret is kept as it is (a signature
    # needs it). deliveries is the durable outbox: one row per (subscription, event),
    # next_at/claim_until in Unix milliseconds, pending until delivered or, after
    # retrying for event_retry_seconds, failed. event_cursor is how far the dispatcher has
    # fanned events out; event_marks holds the one-per-crossing state (the pool low).
    # account_alerts: a customer's low-balance mark and auto-recharge. leases.announced:
    # lease.expired was written for it.
    """
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        type TEXT NOT NULL,
        account_id INTEGER,
        data TEXT NOT NULL DEFAULT '{}',
        dedupe TEXT UNIQUE,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
    );
    CREATE INDEX events_account ON events(account_id, id);
    CREATE TABLE subscriptions (
        id INTEGER PRIMARY KEY,
        account_id INTEGER REFERENCES accounts(id),
        kind TEXT NOT NULL,
        target TEXT NOT NULL,
        events TEXT NOT NULL,
        secret TEXT,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
        deleted_at TEXT,
        last_success_at TEXT,
        last_failure_at TEXT,
        last_failure TEXT
    );
    CREATE INDEX subscriptions_account ON subscriptions(account_id, id);
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY,
        subscription_id INTEGER NOT NULL,
        event_id INTEGER NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending'
            CHECK (status IN ('pending', 'delivered', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at INTEGER NOT NULL,
        first_at INTEGER NOT NULL,
        claim_until INTEGER NOT NULL DEFAULT 0,
        last_status INTEGER,
        last_error TEXT,
        done_at TEXT,
        UNIQUE (subscription_id, event_id)
    );
    CREATE INDEX deliveries_due ON deliveries(next_at) WHERE status = 'pending';
    CREATE INDEX deliveries_event ON deliveries(event_id);
    CREATE TABLE event_cursor (
        name TEXT PRIMARY KEY,
        last_id INTEGER NOT NULL
    );
    INSERT INTO event_cursor (name, last_id) VALUES ('dispatch', 0);
    CREATE TABLE event_marks (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE account_alerts (
        account_id INTEGER PRIMARY KEY REFERENCES accounts(id),
        low_cents INTEGER,
        mail_low INTEGER NOT NULL DEFAULT 1,
        recharge_threshold_cents INTEGER,
        recharge_amount_cents INTEGER
    );
    ALTER TABLE leases ADD COLUMN announced INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX leases_unannounced ON leases(expires_at)
        WHERE announced = 0 AND released_at IS NULL;
    """,
    # 12: allow-listed client addresses (issue 19): a request without credentials from
    # one of a credential's CIDRs runs as that credential. A CIDR is kept in one spelling
    # (datorus_core.allowlist.normalize_cidr) and belongs to one credential only: the most
    # specific CIDR wins where two overlap, and an exact duplicate is refused. A change
    # reaches running gateways like every operator change (config_version). And a receipt's
    # code: the Datorus code of a refused SOCKS5 request, whose client sees one reply byte
    # (NULL for a served request).
    f"""
    CREATE TABLE credential_allowed_ips (
        id INTEGER PRIMARY KEY,
        credential_id INTEGER NOT NULL REFERENCES credentials(id),
        cidr TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
    );
    CREATE INDEX credential_allowed_ips_credential ON credential_allowed_ips(credential_id);
    ALTER TABLE receipts ADD COLUMN code TEXT;
    CREATE TRIGGER allowed_ips_touch_i AFTER INSERT ON credential_allowed_ips BEGIN {_TOUCH}; END;
    CREATE TRIGGER allowed_ips_touch_d AFTER DELETE ON credential_allowed_ips BEGIN {_TOUCH}; END;
    """,
    # 13 (pool worker): service_claims, a named claim with an expiry, so only one process
    # per ledger runs a background service (the pool worker: checks and scheduled
    # scrapes) at a time; egress.check_seq, the number of the check batch that last
    # wrote the egress (from check_sequence's one row), so gateways read only what the
    # checks changed since they last looked (no config_version touch: no full reload).
    """
    CREATE TABLE service_claims (
        name TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        claimed_at INTEGER NOT NULL
    );
    CREATE TABLE check_sequence (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq INTEGER NOT NULL
    );
    INSERT INTO check_sequence (id, seq) VALUES (1, 0);
    ALTER TABLE egress ADD COLUMN check_seq INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX egress_check_seq ON egress(check_seq);
    """,
    # 14: ids an API client deletes by are never reused. SQLite gives a new row the
    # largest id + 1 unless the table is AUTOINCREMENT, so deleting the newest
    # allow-listed address (or source) handed its id to the next one, and a replayed
    # DELETE by id removed another range: both tables are rebuilt AUTOINCREMENT, rows and
    # ids kept. (Credentials, API keys and webhooks are revoked or marked deleted, never
    # deleted; accounts are never deleted; events are AUTOINCREMENT since 11; leases have
    # text ids.) And a revoked credential's allow-listed addresses are removed (revoking
    # now removes them): they held their CIDRs, unique across credentials, for good.
    f"""
    DELETE FROM credential_allowed_ips
        WHERE credential_id IN (SELECT id FROM credentials WHERE revoked_at IS NOT NULL);
    CREATE TABLE credential_allowed_ips_v14 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        credential_id INTEGER NOT NULL REFERENCES credentials(id),
        cidr TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
    );
    INSERT INTO credential_allowed_ips_v14 (id, credential_id, cidr, created_at)
        SELECT id, credential_id, cidr, created_at FROM credential_allowed_ips;
    DROP TABLE credential_allowed_ips;
    ALTER TABLE credential_allowed_ips_v14 RENAME TO credential_allowed_ips;
    CREATE INDEX credential_allowed_ips_credential ON credential_allowed_ips(credential_id);
    CREATE TRIGGER allowed_ips_touch_i AFTER INSERT ON credential_allowed_ips BEGIN {_TOUCH}; END;
    CREATE TRIGGER allowed_ips_touch_d AFTER DELETE ON credential_allowed_ips BEGIN {_TOUCH}; END;
    CREATE TABLE sources_v14 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT,
        url TEXT NOT NULL,
        parser_name TEXT,
        cron_schedule TEXT,
        default_protocol TEXT NOT NULL DEFAULT 'http'
            CHECK (default_protocol IN ('http', 'https', 'socks4', 'socks5')),
        default_country TEXT,
        default_weight INTEGER NOT NULL DEFAULT 1 CHECK (default_weight > 0),
        tags TEXT NOT NULL DEFAULT '{{}}',
        enabled INTEGER NOT NULL DEFAULT 1,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
        updated_at TEXT,
        last_scraped_at TEXT,
        last_error TEXT,
        last_found INTEGER,
        last_new INTEGER,
        last_duration_ms INTEGER,
        next_run_at INTEGER,
        claimed_by TEXT,
        claim_until INTEGER
    );
    INSERT INTO sources_v14 SELECT id, name, url, parser_name, cron_schedule,
        default_protocol, default_country, default_weight, tags, enabled, created_at,
        updated_at, last_scraped_at, last_error, last_found, last_new, last_duration_ms,
        next_run_at, claimed_by, claim_until FROM sources;
    DROP TABLE sources;
    ALTER TABLE sources_v14 RENAME TO sources;
    CREATE INDEX sources_due ON sources(next_run_at) WHERE enabled = 1;
    """,
)


def migrate(conn: sqlite3.Connection) -> int:
    """Apply every migration not yet applied; return the schema version. Idempotent."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(MIGRATIONS, start=1):
            if number <= current:
                continue
            for statement in _split(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={number}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    """The number of the newest migration applied to the open ledger *conn*."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _split(script: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies whole."""
    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip():
        raise ValueError(f"incomplete statement in migration: {buf[:80]!r}")
    return out
