"""The operator's allow and deny rules (``policy_rules``) in the ledger.

The gateway reads them with every snapshot (:mod:`.gateway`); a change bumps
``config_version`` (a trigger).
"""

from __future__ import annotations

from typing import Any

from ..envelope import DatorusError, validation_error
from .db import Ledger


def parse_rule_target(spec: str, action: str) -> tuple[str, int | None]:
    """Split ``CIDR[:PORT]`` / ``DOMAIN[:PORT]`` / ``[v6]:PORT``; raise VALIDATION_ERROR."""
    from ..policy import parse_rule

    try:
        return parse_rule(spec, allow_domains=(action == "deny"))
    except ValueError as e:
        raise validation_error("rule", str(e)) from None


def add_policy_rule(db: Ledger, action: str, spec: str) -> dict[str, Any]:
    """Record an allow or deny rule; idempotent. A CIDR with host bits set is taken as its
    network (scripts rely on it), and ``warning`` says so (else None)."""
    from ..policy import host_bits_set

    target, port = parse_rule_target(spec, action)
    widened = host_bits_set(spec)
    warning = None
    if widened is not None:
        verb = "allowed" if action == "allow" else "denied"
        warning = f"{widened[0]} has host bits set: {verb} {widened[1]}"
    with db.transaction():
        # the table's UNIQUE (action, target, port) lets rows without a port repeat (NULLs
        # differ in SQL), so the rule is looked for null-safely first
        same = db.execute(
            "SELECT 1 FROM policy_rules WHERE action = ? AND target = ? AND port {is} ?",
            (action, target, port),
        ).fetchone()
        if same is None:
            db.execute(
                "INSERT INTO policy_rules (action, target, port) VALUES (?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (action, target, port),
            )
    rule = f"{action} {target}" + (f":{port}" if port is not None else "")
    return {"rule": rule, "action": action, "target": target, "port": port, "warning": warning}


def remove_policy_rule(db: Ledger, action: str, spec: str) -> dict[str, Any]:
    """Delete an allow or deny rule; RESOURCE_NOT_FOUND if there is none."""
    target, port = parse_rule_target(spec, action)
    with db.transaction():
        cur = db.execute(
            "DELETE FROM policy_rules WHERE action = ? AND target = ? AND port {is} ?",
            (action, target, port),
        )
    if cur.rowcount == 0:
        raise DatorusError("RESOURCE_NOT_FOUND", details={"rule": spec})
    return {"rule": f"{action} {spec}", "removed": True}


def list_policy_rules(db: Ledger) -> list[dict[str, Any]]:
    """Every operator policy rule."""
    return db.query("SELECT id, action, target, port, created_at FROM policy_rules ORDER BY id")
