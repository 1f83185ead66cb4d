"""MOBIKE (RFC 4555) as the responder: the initiator moves its IKE SA to new addresses.

Once both announced MOBIKE_SUPPORTED in IKE_AUTH, an INFORMATIONAL request from the
initiator may carry UPDATE_SA_ADDRESSES (3.5): the IKE SA and its tunnel-mode Child SAs
then use the addresses that request came from and went to. NAT detection notifies in any
INFORMATIONAL request are answered with ours for the addresses it used (3.5, 3.8), so a
peer can tell a NAT appeared or its mapping changed; a COOKIE2 is echoed unmodified
(3.8, return routability). ADDITIONAL_*_ADDRESS lists are accepted and not used: we
never move an SA ourselves, and NO_NATS_ALLOWED is not checked.
"""

from __future__ import annotations

from dataclasses import dataclass

from .constants import NotifyType
from .events import Address
from .ike_init import nat_hash, notifies
from .payloads import NotifyPayload, Payload
from .sa import IkeSa


@dataclass(frozen=True, slots=True)
class MobikeAnswer:
    payloads: list[Payload]  # for the response
    update: bool  # the peer asked to move the SA to this request's addresses
    # what its NAT detection says about the peer's side and ours (None: it sent none)
    nat: tuple[bool, bool] | None


def answer_mobike(sa: IkeSa, payloads: list[Payload], local: Address,
                  remote: Address) -> MobikeAnswer:
    """The MOBIKE part of the response to an INFORMATIONAL request on `local`/`remote`."""
    out: list[Payload] = []
    sources = notifies(payloads, NotifyType.NAT_DETECTION_SOURCE_IP)
    destinations = notifies(payloads, NotifyType.NAT_DETECTION_DESTINATION_IP)
    nat: tuple[bool, bool] | None = None
    if sources and destinations:
        nat = (nat_hash(sa.spi_i, sa.spi_r, remote) not in [n.data for n in sources],
               nat_hash(sa.spi_i, sa.spi_r, local) not in [n.data for n in destinations])
        out += [NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP,
                              nat_hash(sa.spi_i, sa.spi_r, local)),
                NotifyPayload(NotifyType.NAT_DETECTION_DESTINATION_IP,
                              nat_hash(sa.spi_i, sa.spi_r, remote))]
    out += notifies(payloads, NotifyType.COOKIE2)[:1]  # 3.8: copied unmodified
    update = bool(notifies(payloads, NotifyType.UPDATE_SA_ADDRESSES))
    return MobikeAnswer(out, update, nat)
