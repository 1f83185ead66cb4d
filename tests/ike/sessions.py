"""Building blocks for in-memory session tests: policies and `transfer(a, b)`."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Literal

from cluster.ike.constants import ProtocolId
from cluster.ike.events import Address, Event
from cluster.ike.identity import parse_identity, parse_identity_pattern
from cluster.ike.policy import (
    ChildConfig,
    ConnectionConfig,
    LocalAuth,
    RemoteAuth,
    ResponderPolicy,
    SharedSecret,
)
from cluster.ike.proposals import ConfiguredProposal, parse_proposal
from cluster.ike.session import IkeSession
from cluster.ike.traffic_selectors import parse_ts_config

GW = ("10.99.0.2", 500)
CLIENT = ("10.99.0.1", 500)


def ike(*texts: str) -> tuple[ConfiguredProposal, ...]:
    return tuple(parse_proposal(t, ProtocolId.IKE, True) for t in texts)


def esp(*texts: str) -> tuple[ConfiguredProposal, ...]:
    return tuple(parse_proposal(t, ProtocolId.ESP, True) for t in texts)


Mode = Literal["tunnel", "transport"]


def child(name: str = "net", mode: Mode = "tunnel", local_ts: str = "10.99.2.0/24",
          remote_ts: str = "10.99.1.0/24", proposals: tuple[str, ...] = ("aes256gcm16",)
          ) -> ChildConfig:
    return ChildConfig(name, mode, (parse_ts_config(local_ts),), (parse_ts_config(remote_ts),),
                       esp(*proposals))


def psk_connection(name: str = "rw", proposals: tuple[str, ...] = ("aes256gcm16-prfsha256-x25519",),
                   local_id: str = "gw.example.test", remote_id: str = "%any",
                   children: tuple[ChildConfig, ...] | None = None) -> ConnectionConfig:
    return ConnectionConfig(
        name, 2, ike(*proposals),
        LocalAuth("psk", parse_identity(local_id)),
        RemoteAuth("psk", parse_identity_pattern(remote_id)),
        children if children is not None else (child(),),
    )


def psk_policy(*connections: ConnectionConfig, secret: bytes = b"change-me",
               ids: tuple[str, ...] = ("gw.example.test", "%any")) -> ResponderPolicy:
    return ResponderPolicy(
        connections or (psk_connection(),),
        (SharedSecret(tuple(parse_identity_pattern(i) for i in ids), secret),),
    )


def client_for(gw_conn: ConnectionConfig,
               client_id: str = "client.example.test") -> ConnectionConfig:
    """The mirror image of a gateway connection, as the initiator's configuration."""
    gw_local = gw_conn.local.identity
    assert gw_local is not None
    children = tuple(replace(c, local_ts=c.remote_ts, remote_ts=c.local_ts)
                     for c in gw_conn.children)
    return replace(
        gw_conn,
        local=LocalAuth("psk", parse_identity(client_id)),
        remote=RemoteAuth("psk", parse_identity_pattern(str(gw_local))),
        children=children,
    )


def transfer(sender: IkeSession, receiver: IkeSession, now: float = 0.0) -> int:
    """Move every pending datagram from sender to receiver; returns how many moved."""
    datagrams = sender.datagrams_to_send()
    for d in datagrams:
        receiver.receive_datagram_untrusted(d.data, d.remote, d.local, now)
    return len(datagrams)


def run_handshake(client: IkeSession, gateway: IkeSession, rounds: int = 6) -> None:
    for _ in range(rounds):
        moved = transfer(client, gateway) + transfer(gateway, client)
        if not moved:
            return


def drain(session: IkeSession) -> list[Event]:
    """Every event the session has queued, oldest first."""
    events: list[Event] = []
    while (event := session.next_event()) is not None:
        events.append(event)
    return events


def psk_pair(gw_conn: ConnectionConfig | None = None,
             client_conn: ConnectionConfig | None = None, *,
             secret: bytes = b"change-me", client_secret: bytes | None = None,
             client: Address = CLIENT, gateway: Address = GW,
             ) -> tuple[IkeSession, IkeSession]:
    """Our initiator (IKE_SA_INIT already queued) and a fresh responder, PSK on both sides."""
    gw_conn = gw_conn or psk_connection()
    policy = psk_policy(gw_conn, secret=secret)
    client_conn = client_conn or client_for(gw_conn)
    client_policy = psk_policy(client_conn, secret=secret if client_secret is None
                               else client_secret, ids=(str(client_conn.local.identity), "%any"))
    initiator = IkeSession.initiator(client_conn, client_policy, os.urandom(8), client, gateway,
                                     0.0)
    responder = IkeSession.responder(policy, os.urandom(8), gateway, client)
    return initiator, responder
