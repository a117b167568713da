"""Allow-listed client addresses of proxy credentials (``credential_allowed_ips``).

A CIDR belongs to one credential: adding one that is listed already (for any live
credential) is ``400 VALIDATION_ERROR`` with ``details.field = "cidr"`` (the 18 codes
have no conflict code for this). Revoking a credential removes its entries in the same
transaction. Entry ids are never reused (migration 14): a replayed ``DELETE`` by id
cannot remove another range. The gateway reads the table with every snapshot
(:mod:`.gateway`); a change bumps ``config_version`` (a trigger).
"""

from __future__ import annotations

from typing import Any

from ..allowlist import normalize_cidr
from ..envelope import DatorusError, validation_error
from .db import IntegrityError, Ledger

_ROWS = """
    SELECT a.id, a.cidr, a.created_at, c.id AS credential_id, c.username
    FROM credential_allowed_ips a JOIN credentials c ON c.id = a.credential_id
"""


def _entry(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": r["id"],
        "cidr": r["cidr"],
        "credentialId": r["credential_id"],
        "username": r["username"],
        "createdAt": r["created_at"],
    }


def _credential(db: Ledger, ident: str, account_id: int | None) -> dict[str, Any]:
    """The live credential with username (or, within an account, id) *ident*."""
    sql = "SELECT id, username, account_id FROM credentials WHERE revoked_at IS NULL AND "
    args: list[Any] = [ident]
    if account_id is None:
        sql += "username = ?"
    else:
        sql += "(username = ? OR CAST(id AS TEXT) = ?) AND account_id = ?"
        args += [ident, account_id]
    rows = db.query(sql, args)
    if not rows:
        raise DatorusError("RESOURCE_NOT_FOUND", details={"credential": ident})
    return rows[0]


def allow_ip(db: Ledger, ident: str, cidr: str, account_id: int | None = None) -> dict[str, Any]:
    """Allow-list *cidr* for the credential *ident* (a username; with *account_id*, its
    id too, within that account). VALIDATION_ERROR (``field`` ``cidr``) for a bad CIDR or
    one listed already; RESOURCE_NOT_FOUND for no such live credential."""
    try:
        net = normalize_cidr(cidr)
    except ValueError as e:
        raise validation_error("cidr", str(e)) from None
    cred = _credential(db, ident, account_id)
    try:
        with db.transaction():
            # an entry of a revoked credential holds no CIDR (revoking removes them; this
            # clears one a ledger from before migration 14 or an older process left)
            db.execute(
                "DELETE FROM credential_allowed_ips WHERE cidr = ? AND credential_id IN"
                " (SELECT id FROM credentials WHERE revoked_at IS NOT NULL)",
                (net,),
            )
            db.execute(
                "INSERT INTO credential_allowed_ips (credential_id, cidr) VALUES (?, ?)",
                (cred["id"], net),
            )
    except IntegrityError:
        raise validation_error(
            "cidr",
            f"{net} is allow-listed already; each CIDR belongs to one credential"
            " (remove it first with 'datorus credential deny-ip')",
        ) from None
    rows = db.query(_ROWS + " WHERE a.cidr = ?", (net,))
    return _entry(rows[0])


def deny_ip(db: Ledger, ident: str, cidr: str, account_id: int | None = None) -> dict[str, Any]:
    """Remove *cidr* from the credential's allow-list; RESOURCE_NOT_FOUND if it is not on it."""
    try:
        net = normalize_cidr(cidr)
    except ValueError as e:
        raise validation_error("cidr", str(e)) from None
    cred = _credential(db, ident, account_id)
    with db.transaction():
        cur = db.execute(
            "DELETE FROM credential_allowed_ips WHERE credential_id = ? AND cidr = ?",
            (cred["id"], net),
        )
    if cur.rowcount == 0:
        raise DatorusError(
            "RESOURCE_NOT_FOUND", details={"allowedIp": net, "credential": cred["username"]}
        )
    return {"username": cred["username"], "cidr": net, "removed": True}


def delete_entry(db: Ledger, account_id: int, ident: str, entry_id: int) -> None:
    """Remove allow-list entry *entry_id* of the account's credential *ident*."""
    cred = _credential(db, ident, account_id)
    with db.transaction():
        cur = db.execute(
            "DELETE FROM credential_allowed_ips WHERE id = ? AND credential_id = ?",
            (entry_id, cred["id"]),
        )
    if cur.rowcount == 0:
        raise DatorusError("RESOURCE_NOT_FOUND", details={"allowedIpId": entry_id})


def list_allowed_ips(
    db: Ledger, account_id: int | None = None, ident: str | None = None
) -> list[dict[str, Any]]:
    """Allow-list entries: of one credential (*ident*, within *account_id* if given), of
    an account's live credentials, or every one."""
    if ident is not None:
        cred = _credential(db, ident, account_id)
        return [_entry(r) for r in db.query(_ROWS + " WHERE c.id = ? ORDER BY a.id", (cred["id"],))]
    if account_id is not None:
        rows = db.query(
            _ROWS + " WHERE c.account_id = ? AND c.revoked_at IS NULL ORDER BY a.id",
            (account_id,),
        )
        return [_entry(r) for r in rows]
    return [_entry(r) for r in db.query(_ROWS + " ORDER BY a.id")]
