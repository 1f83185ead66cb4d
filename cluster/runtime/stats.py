"""Hot-path counters of the responder runtime.

Plain integer attributes: `+= 1` costs about 0.07 us where a prometheus-client
`Counter.inc()` costs 0.42 us (notes/building-blocks.md). A metrics task reads
`as_dict()` periodically and publishes the values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class RuntimeStats:
    # dispatcher
    datagrams_in: int = 0
    datagrams_out: int = 0
    natt_keepalives: int = 0
    dropped_malformed: int = 0
    dropped_esp_on_natt: int = 0  # ESP-in-UDP before the data plane exists (RFC 3948)
    dropped_recv_error: int = 0
    dropped_route_error: int = 0  # a bug in routing; logged with its traceback
    dropped_send_blocked: int = 0  # socket buffer full; the peer retransmits
    dropped_send_error: int = 0
    dropped_no_socket: int = 0  # a session asked to send from an address we do not own
    # supervisor
    dropped_no_sa: int = 0
    dropped_mailbox_full: int = 0
    dropped_half_open_limit: int = 0  # init_limit_half_open reached
    dropped_block_threshold: int = 0  # the peer address holds block_threshold half-open SAs
    dropped_bad_cookie: int = 0  # a COOKIE we did not make for that request
    cookies_sent: int = 0  # stateless N(COOKIE) replies (RFC 7296 2.6)
    cookies_accepted: int = 0  # requests admitted with a valid cookie
    cookies_expired: int = 0  # cookies of a retired secret, answered with a fresh one
    notifies_suppressed: int = 0  # unauthenticated notifies over notify_rate
    actors_started: int = 0
    actors_retired: int = 0
    actor_failures: int = 0
    actors_relinquished: int = 0  # ended because another node acts for their SA now
    half_open_expired: int = 0
    ike_sas_established: int = 0
    ike_sas_deleted: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def summary(self) -> str:
        """One log line: the non-zero counters as `name=value`."""
        return " ".join(f"{k}={v}" for k, v in self.as_dict().items() if v) or "no traffic"
