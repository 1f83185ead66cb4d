"""Sans-IO ESP (RFC 4303): the SAD, anti-replay, encapsulation and decapsulation.

No sockets, no clock, no trio; `cluster.worker` drives it. The whole API a worker needs:

    sad = Sad()
    sad.install(ChildSaParams(...))            # replace(old_spi_in, params) / remove(spi_in)
    sa = sad.outbound_for(packet_from_tun)     # None: no SA covers it (counted), drop it
    esp = sa.encapsulate(packet_from_tun)      # -> UDP payload to sa.remote if sa.encap,
                                               #    else raw protocol 50 to sa.remote[0]
    inner = sad.decapsulate_untrusted(esp)     # -> write to the TUN
    event = sad.next_event()                   # SaSoftExpired / SaHardExpired / SaSequenceExhausted

Both packet functions raise only EspDrop (a ParseError), already counted.

Choices worth knowing:
- AEAD IVs are the 64-bit sequence number (unique per key, RFC 4106 3.1); a restarted
  worker must jump `initial_seq` past anything it may have sent, or rekey.
- CBC uses one long-lived cipher context per direction (see ciphers.py); IVs stay random.
- Headers built here (`encapsulate_ip`'s tunnel-mode outer header, transport-mode
  headers after decapsulation) use TTL 64, DSCP/ECN 0. The worker's sockets give the
  outer headers they send each packet's DSCP and ECN field instead
  (`OutboundSa.tos_mask`: `copy_dscp`, and `copy_ecn` in tunnel mode).
- The outer TOS on receiving (`decapsulate_untrusted(esp, outer_tos)`,
  `decapsulate_batch(esps, {index: outer_tos})`): in tunnel mode its ECN field gives
  the inner packet the one RFC 6040 4.2 Figure 4 says (CE in; Not-ECT under CE dropped
  as `ecn_drops`); a transport-mode packet's rebuilt header takes it whole.
- Transport mode behind a NAT (encap=True): after decapsulation the TCP/UDP checksum is
  recomputed for the rebuilt header (RFC 3948 3.1.2 option 2; ESP's ICV covered the
  segment); an IPv4 UDP checksum of zero stays zero. Without encap it is left alone.
- Inbound policy (RFC 4301 5.2): a decapsulated packet must match the SA's selectors,
  otherwise it is dropped as `policy_drops`.
- Lifetimes count inner-packet bytes and packets per direction; the soft event fires
  once per SA (also when 1/16 of the sequence space is left), the hard limit removes
  the SA after the packet that reached it.
"""

from .counters import EspDrop, SaCounters, SadCounters
from .events import EspEvent, SaHardExpired, SaIdle, SaSequenceExhausted, SaSoftExpired
from .inbound import InboundSa
from .outbound import OutboundSa
from .params import Address, ChildSaParams
from .replay import ReplayWindow
from .sa import ChildSa
from .sad import Sad
from .selector import Selector
from .udp_encap import (
    NAT_KEEPALIVE,
    NON_ESP_MARKER,
    UdpKind,
    classify_udp_untrusted,
    esp_from_ipv4_untrusted,
    ike_from_udp_untrusted,
    ike_to_udp,
)

__all__ = [
    "NAT_KEEPALIVE",
    "NON_ESP_MARKER",
    "Address",
    "ChildSa",
    "ChildSaParams",
    "EspDrop",
    "EspEvent",
    "InboundSa",
    "OutboundSa",
    "ReplayWindow",
    "SaCounters",
    "SaHardExpired",
    "SaIdle",
    "SaSequenceExhausted",
    "SaSoftExpired",
    "Sad",
    "SadCounters",
    "Selector",
    "UdpKind",
    "classify_udp_untrusted",
    "esp_from_ipv4_untrusted",
    "ike_from_udp_untrusted",
    "ike_to_udp",
]
