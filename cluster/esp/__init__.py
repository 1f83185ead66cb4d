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
"""

from .counters import EspDrop, SaCounters, SadCounters
from .events import EspEvent, SaHardExpired, SaSequenceExhausted, SaSoftExpired
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
