"""INFORMATIONAL exchanges (RFC 7296 1.4): liveness checks and deletes."""

from __future__ import annotations

import struct

from .constants import NotifyType, ProtocolId
from .events import ChildSaDeleted
from .payloads import DeletePayload, NotifyPayload, Payload
from .sa import IkeSa


def respond_informational(sa: IkeSa, payloads: list[Payload]) -> tuple[list[Payload], bool]:
    """The response payloads, and whether the peer deleted the IKE SA itself."""
    deletes = [p for p in payloads if isinstance(p, DeletePayload)]
    if any(d.protocol == ProtocolId.IKE for d in deletes):
        return [], True  # 1.4.1: the response is empty and the SA is gone
    ours: list[bytes] = []
    for d in deletes:
        if d.protocol != ProtocolId.ESP:
            continue
        for spi in d.spis:
            ours += delete_children_by_outbound(sa, spi, "deleted by peer")
    return ([DeletePayload(ProtocolId.ESP, tuple(ours))] if ours else []), False


def delete_children_by_outbound(sa: IkeSa, spi_out: bytes, reason: str) -> list[bytes]:
    """Remove the Child SA the peer knows by its inbound SPI; return our inbound SPIs."""
    removed = []
    for spi_in, child in list(sa.children.items()):
        if child.spi_out == spi_out:
            del sa.children[spi_in]
            removed.append(spi_in)
            sa.events.append(ChildSaDeleted(sa.spi_i, sa.spi_r, child.name, spi_in,
                                             child.spi_out, reason))
    return removed


def delete_all_children(sa: IkeSa, reason: str) -> None:
    for spi_in, child in list(sa.children.items()):
        del sa.children[spi_in]
        sa.events.append(ChildSaDeleted(sa.spi_i, sa.spi_r, child.name, spi_in, child.spi_out,
                                        reason))


# --- RFC 6311: message ID synchronisation after a failover ------------------------------

_MID_SYNC = struct.Struct("!4sII")  # nonce, EXPECTED_SEND_REQ_MESSAGE_ID, _RECV_REQ_


def mid_sync_notify(nonce: bytes, send: int, recv: int) -> NotifyPayload:
    """N(IKEV2_MESSAGE_ID_SYNC) (RFC 6311 4.1): the next request ID we send, the next we
    expect to receive."""
    return NotifyPayload(NotifyType.IKEV2_MESSAGE_ID_SYNC, _MID_SYNC.pack(nonce, send, recv))


def parse_mid_sync_untrusted(payloads: list[Payload]) -> tuple[bytes, int, int] | None:
    """(nonce, send, recv) of the first IKEV2_MESSAGE_ID_SYNC notify, if a well-formed one."""
    for p in payloads:
        if isinstance(p, NotifyPayload) and p.notify_type == NotifyType.IKEV2_MESSAGE_ID_SYNC:
            if len(p.data) != _MID_SYNC.size:
                return None
            nonce, send, recv = _MID_SYNC.unpack(p.data)
            return nonce, send, recv
    return None
