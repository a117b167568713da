"""What a finished, failed or cut flow is billed: one decision, from a plain record.

The metering addon counts bytes at the server connection's socket and translates
mitmproxy's events into a :class:`FlowOutcome` (``addons/metering.py``,
``flow_outcome``); :func:`bill` decides from that record alone whether the flow is a
billed request (its bytes settled, a receipt written) or its reservation is dropped.
The rules, in the README's words:

- bytes that crossed to or from the target are billed, and never more than that;
- the gateway's own answers (its envelopes) are never billed, nor a request that
  failed before the target answered (502, 504);
- a client that walks away pays for what it moved (an aborted download, an upload);
- a flow cut because its account ran dry (or because a worker of ``datorus serve`` could
  get no more byte credit while the shared state was out of reach), or by a clean stop,
  is billed what it moved;
- a tunnel's bytes always reached the other side: they are settled as they pass
  (whatever the end), and a tunnel is a billed request unless the gateway answered it.

    >>> b = bill(FlowOutcome(Ending.COMPLETED, status=200, up=120, down=4000))
    >>> b.charged, b.up, b.down, b.status
    (True, 120, 4000, 200)
    >>> bill(FlowOutcome(Ending.FAILED, up=80, timed_out=True)).charged  # our 504
    False
    >>> bill(FlowOutcome(Ending.FAILED, up=80, cut=Cut.BALANCE)).status  # ran dry: 402
    402

Nothing here imports mitmproxy or touches the ledger; the money arithmetic itself
(trial first, nanocents) is ``pricing.py``, and reservations are ``runtime.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Protocol

HEAD_BYTES = 8192  # what a held response's head is assumed to take, beside its body


class Ending(Enum):
    """Which event finished the flow."""

    COMPLETED = "completed"  # the target's response ended (and the upload, if it went on)
    FAILED = "failed"  # the exchange broke off: upstream failure, timeout, cut, client gone
    CONNECT_FAILED = "connect_failed"  # a CONNECT that did not reach its target
    DISCONNECTED = "disconnected"  # the client connection closed with the flow still open
    STOPPED = "stopped"  # a clean stop ended the flow once the drain time was over


class Cut(StrEnum):
    """Why the gateway cut a flow short (a str, as ``FlowCtx.cut`` holds it)."""

    NONE = ""
    BALANCE = "balance"  # the account's allowance or the credential's cap ran out
    CREDIT = "credit"  # a worker's byte credit ran out and the shared state was out of reach
    SUSPENDED = "suspended"  # the account was suspended while the tunnel was open


class ErrorKind(Enum):
    """What broke a failed flow off, as far as billing cares."""

    NONE = "none"
    CLIENT_DISCONNECTED = "client_disconnected"  # the client went away
    INCOMPLETE_BODY = "incomplete_body"  # a peer closed before its message body ended
    OTHER = "other"  # anything else (refused, reset, unresolvable, our timer...)


@dataclass(frozen=True, slots=True)
class FlowOutcome:
    """How one request or tunnel ended: everything :func:`bill` reads."""

    ending: Ending
    tunnel: bool = False  # a CONNECT tunnel or an upgraded (WebSocket) connection
    status: int = 0  # the status the client got or is getting (0: no response head yet)
    up: int = 0  # bytes that crossed to the target
    down: int = 0  # bytes that crossed from the target
    answered: bool = False  # the gateway answered itself (an envelope)
    cut: Cut = Cut.NONE
    client_closed: bool = False  # the client connection had closed when the flow ended
    timed_out: bool = False  # the upstream timer fired (the gateway answers 504)
    error: ErrorKind = ErrorKind.NONE

    @property
    def moved(self) -> bool:
        """Whether any byte crossed between the gateway and the target."""
        return bool(self.up or self.down)

    @property
    def client_gone(self) -> bool:
        """Whether the client walked away (rather than the target or the gateway failing).

        Before any response head, a body that ended early can only be the request's.
        """
        return (
            self.client_closed
            or self.error is ErrorKind.CLIENT_DISCONNECTED
            or (not self.status and self.error is ErrorKind.INCOMPLETE_BODY)
        )


@dataclass(frozen=True, slots=True)
class Bill:
    """What a flow is billed.

    *charged*: it is a billed request (one more request in the usage, and a receipt
    with *status*); otherwise its reservation is released. *up* and *down* are the
    bytes it pays for: all it moved when charged, and for a tunnel in any case (a
    tunnel settles its bytes as they pass).
    """

    charged: bool
    up: int
    down: int
    status: int


def charged(o: FlowOutcome) -> bool:
    """Whether the flow of *o* is a billed request (see the module's rules)."""
    if o.answered:
        return False  # the gateway's own answer
    if o.cut in DRY:
        return True  # ran dry on the way: what it moved reached the target
    if o.ending is Ending.COMPLETED:
        return True
    if o.ending is Ending.CONNECT_FAILED:
        return False
    if o.ending is Ending.STOPPED:
        return o.tunnel or o.moved
    if o.ending is Ending.DISCONNECTED:
        return o.tunnel or bool(o.status)
    # FAILED: a response had begun, or the client walked away (not after our timer
    # fired: that is the gateway's 504)
    return bool(o.status) or (o.client_gone and not o.timed_out and o.moved)


def bill(o: FlowOutcome) -> Bill:
    """What the flow of *o* is billed: whether it is charged, its bytes and its status.

    The receipt's status is the one the client got; a forward request cut before its
    response began gets the 402 (the 503 when it was cut for want of shared credit).
    """
    c = charged(o)
    paid = c or o.tunnel
    status = o.status or DRY.get(o.cut, 0)
    return Bill(c, o.up if paid else 0, o.down if paid else 0, status)


# the cuts for want of credit, and the status a request cut before its response gets
DRY = {Cut.BALANCE: 402, Cut.CREDIT: 503}


def answers_cut(tunnel: bool, head_sent: bool) -> bool:
    """Whether a flow cut for want of credit is answered (the 402, or the 503 of a
    shared state out of reach) rather than closed.

    Only a forward request whose response head has not reached the client can still
    be answered (its ``X-Datorus-Used-Bytes`` is what it moved), also when the head
    came from the target and was held with its body; a tunnel or a response under
    way is closed.
    """
    return not tunnel and not head_sent


# -- holding a body whole --------------------------------------------------------------


class Account(Protocol):
    """What :func:`allowance_covers` reads of an account (``runtime.AccountState``)."""

    @property
    def allowance(self) -> int: ...

    @property
    def inflight(self) -> int: ...


class Credential(Protocol):
    """What :func:`allowance_covers` reads of a credential (``runtime.CredentialState``)."""

    @property
    def account(self) -> Account: ...

    def room(self) -> int: ...


class Holder(Protocol):
    """A flow with the credential it is billed to (``FlowCtx``)."""

    @property
    def cred(self) -> Credential | None: ...


def allowance_covers(flow: Holder, body: int) -> bool:
    """Whether the account's allowance and the credential's cap cover *body* bytes more.

    A body held whole reaches the client only once it is complete: one that ran the
    account dry on the way would be paid for and never seen. Hold only what is covered
    (the body and its head, ``HEAD_BYTES``).
    """
    cred = flow.cred
    if cred is None:
        return False
    acc = cred.account
    need = body + HEAD_BYTES
    return need < acc.allowance - acc.inflight and need < cred.room()
