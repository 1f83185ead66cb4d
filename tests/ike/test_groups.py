"""swanctl's `groups` on eap-radius connections: the groups of the user's Access-Accept
(its Class attributes, the Filter-Id of an ESP Tunnel-Type) decide, and a user outside
a connection's groups moves on to the next connection the authentication done fits, as
strongSwan switches after authentication. (FreeRADIUS with strongSwan in tests/interop
is the judge of the whole exchange.)"""

from __future__ import annotations

from dataclasses import replace

import pytest

from cluster.errors import AuthenticationFailed
from cluster.ike.identity import parse_identity, parse_identity_pattern
from cluster.ike.ike_auth import _connection_for_groups
from cluster.ike.policy import ConnectionConfig, LocalAuth, RemoteAuth
from cluster.ike.sa import IkeSa
from tests.ike.sessions import psk_connection, psk_policy
from tests.ike.test_radius import relay


def eap_radius(name: str, groups: tuple[str, ...] = (), *, eap_id: str = "%any",
               local_id: str = "gw.example.test") -> ConnectionConfig:
    return replace(psk_connection(name),
                   local=LocalAuth("pubkey", parse_identity(local_id)),
                   remote=RemoteAuth("eap-radius", parse_identity_pattern("%any"),
                                     eap_id=parse_identity_pattern(eap_id), groups=groups))


def choose(connections: tuple[ConnectionConfig, ...], user: bytes, groups: tuple[str, ...]
           ) -> str:
    """The connection a user in these groups ends on, having started EAP on the first."""
    sa = IkeSa(psk_policy(*connections), False, bytes(8), bytes(8), ("192.0.2.1", 4500),
               ("198.51.100.7", 4500))
    sa.connection, sa.remote_id = connections[0], parse_identity("client.example.test")
    sa.local_id = parse_identity("gw.example.test")
    server, _ = relay(lambda request: None)
    server.identity, server.groups = user, frozenset(groups)
    return _connection_for_groups(sa, connections[0], server).name


ADMINS = eap_radius("admins", ("admins", "netops"))
STAFF = eap_radius("staff")


def test_a_user_in_one_of_the_groups_stays_on_the_connection() -> None:
    assert choose((ADMINS, STAFF), b"carol", ("netops",)) == "admins"
    assert choose((ADMINS, STAFF), b"carol", ("guests", "admins")) == "admins"


def test_a_user_outside_them_moves_to_the_next_connection_that_fits() -> None:
    assert choose((ADMINS, STAFF), b"dave", ()) == "staff"
    assert choose((ADMINS, STAFF), b"dave", ("Admins",)) == "staff"  # names are exact
    contractors = eap_radius("contractors", ("contractors",))
    assert choose((ADMINS, contractors, STAFF), b"erin", ("contractors",)) == "contractors"


@pytest.mark.parametrize("misfit", [
    eap_radius("other-gateway-id", local_id="vpn.example.test"),
    eap_radius("other-eap-ids", eap_id="*@corp.example"),
    replace(STAFF, name="mschapv2",
            remote=RemoteAuth("eap-mschapv2", parse_identity_pattern("%any"))),
])
def test_a_connection_the_authentication_done_does_not_fit_is_passed_over(
        misfit: ConnectionConfig) -> None:
    assert choose((ADMINS, misfit, STAFF), b"dave", ()) == "staff"
    with pytest.raises(AuthenticationFailed, match="in none of the groups of connection "
                                                   "'admins'"):
        choose((ADMINS, misfit), b"dave", ())
