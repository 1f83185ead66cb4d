"""cluster.config: the example loads, every mistake is one line naming file, key and reason."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from cluster.config import (
    DEFAULT_ESP_PROPOSALS,
    DEFAULT_IKE_PROPOSALS,
    Initiation,
    NodeConfig,
    load_config,
)
from cluster.errors import ConfigError
from cluster.ike.events import TFC_MTU
from cluster.ike.identity import parse_identity
from cluster.ike.policy import VolumeLimits
from cluster.ike.traffic_selectors import parse_ts_config

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cret-Value-77"

BASE = f"""\
[node]
id = "gw1"
[ike]
addresses = ["10.99.0.2"]
[connections.rw]
version = 2
proposals = ["aes256gcm16-prfsha256-x25519", "aes128-sha256-modp2048"]
local = {{ auth = "psk", id = "gw.example.test" }}
remote = {{ auth = "psk", id = "%any" }}
[connections.rw.children.net]
mode = "tunnel"
local_ts = ["10.99.2.0/24"]
remote_ts = ["10.99.1.0/24"]
esp_proposals = ["aes256gcm16", "aes128gcm16"]
[secrets.rw]
ids = ["gw.example.test", "%any"]
secret = "{SECRET}"
"""


def edit(*pairs: tuple[str, str]) -> str:
    text = BASE
    for old, new in pairs:
        assert old in text, old
        text = text.replace(old, new, 1)
    return text


def write(tmp_path: Path, text: str | bytes, name: str = "node.toml") -> Path:
    path = tmp_path / name
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


# --- what loads ------------------------------------------------------------------------


def test_example_file_loads_as_written() -> None:
    config = load_config(REPO / "config" / "example.toml")
    assert config.node_id == "gw1"
    assert config.addresses == ("10.99.0.2",)
    assert (config.ike_port, config.natt_port, config.log_level) == (500, 4500, "info")
    (conn,) = config.policy.connections
    assert conn.name == "rw" and conn.version == 2
    assert [p.text for p in conn.proposals] == [
        "aes256gcm16-prfsha256-x25519",
        "aes128-sha256-modp2048",
        "aes256-sha384-ecp384",
    ]
    assert conn.local.method == "psk"
    assert conn.local.identity == parse_identity("gw.example.test")
    assert conn.remote.method == "psk" and conn.remote.identity.any
    (child,) = conn.children
    assert (child.name, child.mode) == ("net", "tunnel")
    assert child.local_ts == (parse_ts_config("10.99.2.0/24"),)
    assert child.remote_ts == (parse_ts_config("10.99.1.0/24"),)
    assert [p.text for p in child.esp_proposals] == ["aes256gcm16", "aes128gcm16"]
    peer = parse_identity("carol@example.test")
    assert config.policy.find_psk(conn.local.identity, peer) == b"change-me"
    assert config.extra_tables == {}


def test_local_example_differs_only_in_address() -> None:
    example = (REPO / "config" / "example.toml").read_text().splitlines()
    local = (REPO / "config" / "local.toml").read_text().splitlines()
    differing = [(a, b) for a, b in zip(example, local, strict=True) if a != b]
    assert differing == [
        (
            'addresses = ["10.99.0.2"]          # UDP 500 and 4500 bound on each',
            'addresses = ["127.0.0.1"]          # UDP 500 and 4500 bound on each',
        )
    ]
    assert load_config(REPO / "config" / "local.toml").addresses == ("127.0.0.1",)


def test_omitted_keys_take_swanctl_like_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
[node]
id = "n"
[ike]
addresses = ["::1"]
[connections.c]
local = {{ auth = "psk" }}
remote = {{ auth = "psk" }}
[connections.c.children.x]
[secrets.s]
ids = ["%any"]
secret = "{SECRET}"
""",
    )
    config = load_config(path)
    (conn,) = config.policy.connections
    assert conn.version == 2
    assert tuple(p.text for p in conn.proposals) == DEFAULT_IKE_PROPOSALS
    assert conn.local.identity is None
    assert conn.remote.identity.any
    assert (conn.encap, conn.local_addrs, conn.remote_addrs) == (False, (), ())
    (child,) = conn.children
    assert child.mode == "tunnel"
    assert child.start_action == "none"
    assert config.initiations == ()
    assert [ts.selector for ts in (*child.local_ts, *child.remote_ts)] == [None, None]
    assert tuple(p.text for p in child.esp_proposals) == DEFAULT_ESP_PROPOSALS
    assert config.policy.legacy_algorithms is False
    assert config.policy.half_open_timeout == 30.0
    assert config.dh_reuse == 10.0


@pytest.mark.parametrize(("value", "seconds"), [("0", 0.0), ('"30s"', 30.0), ("2.5", 2.5)])
def test_dh_reuse_is_a_duration(tmp_path: Path, value: str, seconds: float) -> None:
    path = write(tmp_path, BASE.replace('addresses = ["10.99.0.2"]',
                                        f'addresses = ["10.99.0.2"]\ndh_reuse = {value}'))
    assert load_config(path).dh_reuse == seconds


def test_default_keyword_expands_in_place(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        edit(
            ('proposals = ["aes256gcm16-prfsha256-x25519", "aes128-sha256-modp2048"]',
             'proposals = ["aes128-sha256-modp2048", "default"]'),
            ('esp_proposals = ["aes256gcm16", "aes128gcm16"]',
             'esp_proposals = ["default", "aes128-sha256"]'),
        ),
    )
    (conn,) = load_config(path).policy.connections
    assert [p.text for p in conn.proposals] == ["aes128-sha256-modp2048", *DEFAULT_IKE_PROPOSALS]
    assert [p.text for p in conn.children[0].esp_proposals] == [
        *DEFAULT_ESP_PROPOSALS,
        "aes128-sha256",
    ]


def test_optional_node_ike_and_connection_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        edit(
            ('id = "gw1"\n', 'id = "gw1"\nlog_level = "debug"\n'),
            ('addresses = ["10.99.0.2"]\n',
             'addresses = ["10.99.0.2", "fd99::2"]\nport = 1500\nport_nat_t = 14500\n'
             "legacy_algorithms = true\nhalf_open_timeout = 2.5\n"),
            ("version = 2\n",
             'version = 2\nencap = true\nlocal_addrs = ["10.99.0.2"]\n'
             'remote_addrs = ["10.99.1.0/24", "fd99:1::1"]\n'),
            ("[secrets.rw]",
             '[cluster]\nstore = "redis://r"\nkey = "env:K"\nrelay = "10.99.0.2"\n'
             'membership_ttl = "3s"\n[metrics]\nlisten = "127.0.0.1:9100"\n'
             "[secrets.rw]"),
            ('mode = "tunnel"', 'mode = "transport"'),
        ),
    )
    config = load_config(path)
    assert config.log_level == "debug"
    assert config.addresses == ("10.99.0.2", "fd99::2")
    assert (config.ike_port, config.natt_port) == (1500, 14500)
    assert config.policy.legacy_algorithms is True
    assert config.policy.half_open_timeout == 2.5
    (conn,) = config.policy.connections
    assert conn.encap is True
    assert conn.local_addrs == ("10.99.0.2",)
    assert conn.remote_addrs == ("10.99.1.0/24", "fd99:1::1")
    assert conn.children[0].mode == "transport"
    assert config.extra_tables == {}
    assert config.cluster is not None
    assert (config.cluster.store, config.cluster.key) == ("redis://r", "env:K")
    assert config.cluster.relay == "10.99.0.2:4800"
    assert config.cluster.membership_ttl == 3.0
    assert config.metrics is not None and config.metrics.listen == "127.0.0.1:9100"


def test_legacy_algorithms_allow_legacy_proposals(tmp_path: Path) -> None:
    text = edit(('"aes128-sha256-modp2048"', '"aes128-sha1-modp2048"'))
    assert "legacy" in load_error(write(tmp_path, text))
    text = text.replace('addresses = ["10.99.0.2"]', 'addresses = ["10.99.0.2"]\n'
                        "legacy_algorithms = true")
    config = load_config(write(tmp_path, text))
    assert config.policy.connections[0].proposals[1].text == "aes128-sha1-modp2048"


def test_secret_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IKE_TEST_PSK", "from-the-env")
    path = write(tmp_path, edit((f'secret = "{SECRET}"', 'secret_env = "IKE_TEST_PSK"')))
    assert load_config(path).policy.secrets[0].secret == b"from-the-env"


def test_secret_file_is_relative_to_the_config_and_loses_its_line_break(
    tmp_path: Path,
) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "psk.txt").write_text("from-a-file\n")
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    path = write(conf_dir, edit((f'secret = "{SECRET}"', 'secret_file = "../keys/psk.txt"')))
    assert load_config(path).policy.secrets[0].secret == b"from-a-file"


@pytest.mark.parametrize(
    ("written", "secret"),
    [("0x0102ff", b"\x01\x02\xff"), ("0sAQL/", b"\x01\x02\xff"), ("plain text", b"plain text")],
)
def test_secret_encodings_follow_strongswan(tmp_path: Path, written: str, secret: bytes) -> None:
    path = write(tmp_path, edit((f'secret = "{SECRET}"', f'secret = "{written}"')))
    assert load_config(path).policy.secrets[0].secret == secret


def test_secret_never_appears_in_repr(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE))
    assert config.policy.secrets[0].secret == SECRET.encode()
    assert SECRET not in repr(config)


# --- start_action = "start": this node initiates ----------------------------------------

START = edit(
    ("version = 2\n", 'version = 2\nremote_addrs = ["10.99.1.1"]\n'),
    ('mode = "tunnel"', 'mode = "transport"\nstart_action = "start"'),
)
SECOND_CHILD = """
[connections.rw.children.second]
mode = "transport"
"""


def test_start_child_makes_an_initiation_from_the_first_ike_address(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, START))
    (conn,) = config.policy.connections
    assert conn.children[0].start_action == "start"
    assert config.initiations == (
        Initiation(connection=conn, local="10.99.0.2", remote="10.99.1.1", remote_port=500),
    )
    assert config.initiations[0].child == "net"


def test_vips_ask_for_each_version_once(tmp_path: Path) -> None:
    text = START.replace("[connections.rw.children.net]",
                         'vips = ["0.0.0.0", "::", "0.0.0.0"]\n[connections.rw.children.net]')
    (conn,) = load_config(write(tmp_path, text)).policy.connections
    assert conn.vips == (4, 6)


@pytest.mark.parametrize(("start", "action", "error"), [
    ("start", "restart", None),
    ("trap", "restart", None),
    ("trap", "trap", None),
    ("start", "trap", '"trap" needs the child\'s start_action = "trap"'),
])
def test_dpd_action_of_an_initiated_connection(tmp_path: Path, start: str, action: str,
                                               error: str | None) -> None:
    text = START.replace('"start"', f'"{start}"').replace('"transport"', '"tunnel"').replace(
        "version = 2\n", f'version = 2\ndpd_action = "{action}"\n')
    path = write(tmp_path, text + '[worker]\ntun = "ikec7"\n')
    if error is None:
        (conn,) = load_config(path).policy.connections
        assert conn.dpd_action == action
    else:
        message = load_error(path)
        assert message.startswith(f"{path}: connections.rw.dpd_action: ") and error in message


def test_dpd_action_on_the_child_as_in_swanctl(tmp_path: Path) -> None:
    text = START.replace('start_action = "start"', 'start_action = "start"\ndpd_action = "restart"')
    (conn,) = load_config(write(tmp_path, text)).policy.connections
    assert conn.dpd_action == "restart"
    both = text.replace("version = 2\n", 'version = 2\ndpd_action = "restart"\n')
    path = write(tmp_path, both)
    assert load_error(path) == (f"{path}: connections.rw.dpd_action: also given in "
                                "connections.rw.children.net.dpd_action: give it once")
    wrong = text.replace('dpd_action = "restart"', 'dpd_action = "hold"')
    path = write(tmp_path, wrong)
    assert load_error(path).startswith(
        f"{path}: connections.rw.children.net.dpd_action: 'hold' is not one of")


def test_trap_child_makes_an_on_demand_initiation(tmp_path: Path) -> None:
    text = START.replace('"start"', '"trap"').replace('"transport"', '"tunnel"')
    config = load_config(write(tmp_path, text + '[worker]\ntun = "ikec7"\n'))
    (conn,) = config.policy.connections
    assert conn.children[0].start_action == "trap"
    assert config.initiations == (Initiation(connection=conn, local="10.99.0.2",
                                             remote="10.99.1.1", on_demand=True),)


def test_start_child_goes_first_in_the_initiated_copy_only(tmp_path: Path) -> None:
    text = (
        BASE.replace("version = 2\n", 'version = 2\nremote_addrs = ["10.99.1.1"]\n')
        .replace("[secrets.rw]", SECOND_CHILD + 'start_action = "start"\n[secrets.rw]')
    )
    config = load_config(write(tmp_path, text))
    (conn,) = config.policy.connections
    assert [c.name for c in conn.children] == ["net", "second"]  # the responder's view
    (initiation,) = config.initiations
    assert [c.name for c in initiation.connection.children] == ["second", "net"]
    assert initiation.child == "second"
    assert initiation.connection.proposals == conn.proposals


def test_several_start_children_make_one_initiation(tmp_path: Path) -> None:
    """IKE_AUTH brings the first up, CREATE_CHILD_SA each other (the session does)."""
    text = START.replace("[secrets.rw]", SECOND_CHILD + 'start_action = "start"\n[secrets.rw]')
    config = load_config(write(tmp_path, text))
    (conn,) = config.policy.connections
    (initiation,) = config.initiations
    assert [(c.name, c.start_action) for c in initiation.connection.children] == \
        [("net", "start"), ("second", "start")]
    assert initiation.connection == conn


@pytest.mark.parametrize(
    ("addresses", "extra", "remote", "local"),
    [
        ('["10.99.0.2", "fd99::2"]', "", "fd99:1::1", "fd99::2"),
        ('["fd99::2", "10.99.0.2"]', "", "10.99.1.1", "10.99.0.2"),
        ('["0.0.0.0"]', "", "10.99.1.1", "0.0.0.0"),  # the route picks the source
        ('["0.0.0.0"]', 'local_addrs = ["10.99.0.0/24", "fd99::9", "10.99.0.7"]\n',
         "10.99.1.1", "10.99.0.7"),
        ('["10.99.0.2", "10.99.0.3"]', 'local_addrs = ["10.99.0.3"]\n', "10.99.1.1",
         "10.99.0.3"),
        ('["10.99.0.2"]', 'local_addrs = ["%any"]\n', "10.99.1.1", "10.99.0.2"),
    ],
)
def test_initiation_source_address(
    tmp_path: Path, addresses: str, extra: str, remote: str, local: str
) -> None:
    text = START.replace('addresses = ["10.99.0.2"]', f"addresses = {addresses}").replace(
        'remote_addrs = ["10.99.1.1"]\n', f'remote_addrs = ["{remote}"]\n{extra}'
    )
    (initiation,) = load_config(write(tmp_path, text)).initiations
    assert (initiation.local, initiation.remote) == (local, remote)


def test_remote_port_is_where_the_initiation_goes(tmp_path: Path) -> None:
    text = START.replace("version = 2\n", "version = 2\nremote_port = 1500\n")
    (initiation,) = load_config(write(tmp_path, text)).initiations
    assert initiation.remote_port == 1500


START_ERROR_CASES: list[tuple[str, str, str, str]] = [
    # (case, file content, dotted key, part of the reason)
    ("trap without a data plane",
     START.replace('"start"', '"trap"').replace('"transport"', '"tunnel"'),
     "connections.rw.children.net.start_action", '"trap" needs the [worker] data plane'),
    ("trap without remote_addrs", START.replace('"start"', '"trap"').replace(
        '"transport"', '"tunnel"').replace('remote_addrs = ["10.99.1.1"]\n', ""),
     "connections.rw.remote_addrs", 'start_action = "trap" in children.net needs exactly one'),
    ("unknown", START.replace('"start"', '"always"'),
     "connections.rw.children.net.start_action", "'always' is not one of"),
    ("type", START.replace('"start"', "true"),
     "connections.rw.children.net.start_action", "expected a string"),
    ("no remote_addrs", START.replace('remote_addrs = ["10.99.1.1"]\n', ""),
     "connections.rw.remote_addrs", "exactly one peer address to initiate to, 0 given"),
    ("two remote_addrs", START.replace('["10.99.1.1"]', '["10.99.1.1", "10.99.1.2"]'),
     "connections.rw.remote_addrs", "exactly one peer address to initiate to, 2 given"),
    ("remote %any", START.replace('["10.99.1.1"]', '["%any"]'),
     "connections.rw.remote_addrs[0]", "concrete peer address to initiate to, not '%any'"),
    ("remote subnet", START.replace('["10.99.1.1"]', '["10.99.1.0/24"]'),
     "connections.rw.remote_addrs[0]", "concrete peer address"),
    ("remote unspecified", START.replace('["10.99.1.1"]', '["0.0.0.0"]'),
     "connections.rw.remote_addrs[0]", "'0.0.0.0' is not a peer address"),
    ("no [ike] address of the family", START.replace('["10.99.1.1"]', '["fd99::1"]'),
     "connections.rw.remote_addrs[0]", "the peer is IPv6 but no [ike] address is"),
    ("local_addrs not bound",
     START.replace("version = 2\n", 'version = 2\nlocal_addrs = ["10.99.0.9"]\n'),
     "connections.rw.local_addrs[0]", "'10.99.0.9' is not one of the [ike] addresses"),
    ("local_addrs without an address of the family",
     START.replace("version = 2\n", 'version = 2\nlocal_addrs = ["10.99.0.0/24", "fd::1"]\n'),
     "connections.rw.local_addrs", "needs an IPv4 address here to initiate from"),
    ("trap beside start",
     START.replace("[secrets.rw]", SECOND_CHILD + 'start_action = "trap"\n[secrets.rw]')
     + '[worker]\ntun = "ikec7"\n',
     "connections.rw.children.second.start_action",
     '"trap" needs a connection of its own: children.net has start_action "start"'),
    ("remote_port", START.replace("version = 2\n", "version = 2\nremote_port = 0\n"),
     "connections.rw.remote_port", "0 is not a UDP port"),
]


@pytest.mark.parametrize(
    ("content", "key", "reason"),
    [case[1:] for case in START_ERROR_CASES],
    ids=[case[0] for case in START_ERROR_CASES],
)
def test_start_action_mistake_names_the_key(
    tmp_path: Path, content: str, key: str, reason: str
) -> None:
    path = write(tmp_path, content)
    message = load_error(path)
    assert "\n" not in message
    prefix = f"{path}: {key}: "
    assert message.startswith(prefix), message
    assert reason in message[len(prefix):], message


def test_updown_is_a_command_line_of_a_program_that_exists(tmp_path: Path) -> None:
    text = edit(('mode = "tunnel"\n', 'mode = "tunnel"\nupdown = "true --flag \'a b\'"\n'))
    (conn,) = load_config(write(tmp_path, text)).policy.connections
    assert conn.children[0].updown == "true --flag 'a b'"  # the shell gets it as written


def test_inactivity_is_a_duration_and_off_by_default(tmp_path: Path) -> None:
    (conn,) = load_config(write(tmp_path, BASE)).policy.connections
    assert conn.children[0].inactivity == 0.0
    text = edit(('mode = "tunnel"\n', 'mode = "tunnel"\ninactivity = "30m"\n'))
    (conn,) = load_config(write(tmp_path, text)).policy.connections
    assert conn.children[0].inactivity == 1800.0


def test_copy_dscp_is_out_by_default_or_no(tmp_path: Path) -> None:
    (conn,) = load_config(write(tmp_path, BASE)).policy.connections
    assert conn.children[0].copy_dscp is True
    for value, copies in (("out", True), ("no", False)):
        text = edit(('mode = "tunnel"\n', f'mode = "tunnel"\ncopy_dscp = "{value}"\n'))
        (conn,) = load_config(write(tmp_path, text)).policy.connections
        assert conn.children[0].copy_dscp is copies


@pytest.mark.parametrize("key", ["hostaccess", "sha256_96"])
def test_these_child_switches_are_off_by_default_as_in_swanctl(tmp_path: Path,
                                                              key: str) -> None:
    (conn,) = load_config(write(tmp_path, BASE)).policy.connections
    assert getattr(conn.children[0], key) is False
    text = edit(('mode = "tunnel"\n', f'mode = "tunnel"\n{key} = true\n'))
    (conn,) = load_config(write(tmp_path, text)).policy.connections
    assert getattr(conn.children[0], key) is True


def test_a_childs_replay_window_overrides_the_workers(tmp_path: Path) -> None:
    (conn,) = load_config(write(tmp_path, BASE)).policy.connections
    assert conn.children[0].replay_window == 0  # the data plane's
    text = edit(('mode = "tunnel"\n', 'mode = "tunnel"\nreplay_window = 4096\n'))
    (conn,) = load_config(write(tmp_path, text)).policy.connections
    assert conn.children[0].replay_window == 4096


def test_tfc_padding_is_bytes_or_mtu(tmp_path: Path) -> None:
    for value, expected in (("", 0), ("tfc_padding = 1200\n", 1200),
                            ('tfc_padding = "mtu"\n', TFC_MTU)):
        text = edit(('mode = "tunnel"\n', 'mode = "tunnel"\n' + value))
        (conn,) = load_config(write(tmp_path, text)).policy.connections
        assert conn.children[0].tfc_padding == expected


def test_keyingtries_is_never_give_up_unless_given(tmp_path: Path) -> None:
    (conn,) = load_config(write(tmp_path, BASE)).policy.connections
    assert conn.keyingtries == 0
    text = BASE.replace("version = 2\n", "version = 2\nkeyingtries = 3\n")
    (conn,) = load_config(write(tmp_path, text)).policy.connections
    assert conn.keyingtries == 3


def test_fragmentation_follows_swanctl(tmp_path: Path) -> None:
    for value, expected in ((None, "yes"), ("force", "yes"), ("accept", "accept"),
                            ("no", "no")):
        text = BASE if value is None else BASE.replace(
            "version = 2\n", f'version = 2\nfragmentation = "{value}"\n')
        (conn,) = load_config(write(tmp_path, text)).policy.connections
        assert conn.fragmentation == expected


def test_send_cert_and_send_certreq(tmp_path: Path) -> None:
    (conn,) = load_config(write(tmp_path, BASE)).policy.connections
    assert (conn.send_cert, conn.send_certreq) == ("always", True)
    text = BASE.replace("version = 2\n", 'version = 2\nsend_cert = "ifasked"\n'
                                          "send_certreq = false\n")
    (conn,) = load_config(write(tmp_path, text)).policy.connections
    assert (conn.send_cert, conn.send_certreq) == ("ifasked", False)


def test_childless_is_allow_by_default_as_in_swanctl(tmp_path: Path) -> None:
    (conn,) = load_config(write(tmp_path, BASE)).policy.connections
    assert conn.childless == "allow"
    for value in ("force", "never"):
        text = BASE.replace("version = 2\n", f'version = 2\nchildless = "{value}"\n')
        (conn,) = load_config(write(tmp_path, text)).policy.connections
        assert conn.childless == value


def test_close_action_is_none_by_default_as_in_swanctl(tmp_path: Path) -> None:
    (conn,) = load_config(write(tmp_path, BASE)).policy.connections
    assert conn.children[0].close_action == "none"
    text = edit(('mode = "tunnel"\n', 'mode = "tunnel"\nclose_action = "start"\n'))
    (conn,) = load_config(write(tmp_path, text)).policy.connections
    assert conn.children[0].close_action == "start"


def test_copy_ecn_is_on_by_default_as_in_swanctl(tmp_path: Path) -> None:
    (conn,) = load_config(write(tmp_path, BASE)).policy.connections
    assert conn.children[0].copy_ecn is True
    text = edit(('mode = "tunnel"\n', 'mode = "tunnel"\ncopy_ecn = false\n'))
    (conn,) = load_config(write(tmp_path, text)).policy.connections
    assert conn.children[0].copy_ecn is False


def test_volume_limits_follow_swanctl(tmp_path: Path) -> None:
    (conn,) = load_config(write(tmp_path, BASE)).policy.connections
    assert conn.children[0].volume == VolumeLimits()
    text = edit(('mode = "tunnel"\n', 'mode = "tunnel"\nrekey_bytes = 1000000\n'
                 "rekey_packets = 5000\nlife_packets = 6000\n"))
    (conn,) = load_config(write(tmp_path, text)).policy.connections
    # life_bytes: 110 % of rekey_bytes when not given, rand_*: life minus rekey, as in
    # swanctl
    assert conn.children[0].volume == VolumeLimits(1000000, 1100000, 5000, 6000,
                                                   100000, 1000)
    text = edit(('mode = "tunnel"\n', 'mode = "tunnel"\nlife_bytes = 4096\n'))
    (conn,) = load_config(write(tmp_path, text)).policy.connections
    assert conn.children[0].volume == VolumeLimits(0, 4096, 0, 0)
    text = edit(('mode = "tunnel"\n', 'mode = "tunnel"\nrekey_bytes = 1000\n'
                 "rand_bytes = 0\nrekey_packets = 100\nlife_packets = 900\n"))
    (conn,) = load_config(write(tmp_path, text)).policy.connections
    # no random part when told so; never the whole rekey limit by default
    assert conn.children[0].volume == VolumeLimits(1000, 1100, 100, 900, 0, 99)


def test_ppks_follow_swanctl(tmp_path: Path) -> None:
    text = edit(("version = 2\n", 'version = 2\nppk_id = "pq-1"\nppk_required = true\n'))
    config = load_config(write(tmp_path, text + '[secrets.ppk-1]\nids = ["pq-1"]\n'
                                              'secret = "0x00112233"\n'))
    (conn,) = config.policy.connections
    assert (conn.ppk_id, conn.ppk_required) == (b"pq-1", True)
    assert config.policy.find_ppk(b"pq-1") == bytes.fromhex("00112233")
    assert config.policy.find_ppk(b"pq-2") is None
    assert config.policy.find_psk(None, conn.local.identity) != bytes.fromhex("00112233")


def test_unique_follows_swanctl(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, BASE)).policy.connections[0].unique == "no"
    text = edit(("version = 2\n", 'version = 2\nunique = "replace"\n'))
    assert load_config(write(tmp_path, text)).policy.connections[0].unique == "replace"


def test_mobike_is_on_unless_turned_off(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, BASE)).policy.connections[0].mobike
    off = edit(("version = 2\n", "version = 2\nmobike = false\n"))
    assert not load_config(write(tmp_path, off)).policy.connections[0].mobike


def test_pools_are_shared_by_the_connections_naming_them(tmp_path: Path) -> None:
    text = edit(("version = 2\n", 'version = 2\npools = ["v4", "v6"]\n')) + (
        '[pools.v4]\naddrs = "10.99.3.0/24"\ndns = ["10.99.2.53"]\n'
        '[pools.v6]\naddrs = "fd99:3::10-fd99:3::1f"\n')
    text += text[text.index("[connections.rw]"):text.index("[secrets.rw]")].replace(
        "connections.rw", "connections.rw2")
    policy = load_config(write(tmp_path, text)).policy
    first, second = policy.connections
    assert [(p.name, str(p.first), p.size) for p in first.pools] == [
        ("v4", "10.99.3.1", 254), ("v6", "fd99:3::10", 16)]
    assert [str(d) for d in first.pools[0].dns] == ["10.99.2.53"]
    assert all(a is b for a, b in zip(first.pools, second.pools, strict=True))


# --- what does not load: one line, naming file, key and reason -------------------------

NO_SECRETS = BASE[: BASE.index("[secrets.rw]")]

ERROR_CASES: list[tuple[str, str | bytes, str, str]] = [
    # (case, file content, dotted key ("" for the file itself), part of the reason)
    ("toml syntax", BASE.replace("[node]", "[node"), "line 1", "column"),
    ("not utf-8", BASE.encode() + b"# \xff\n", "", "not UTF-8"),
    ("unknown table", BASE.replace("[node]", "[nodes]"), "nodes", "did you mean 'node'"),
    ("unknown key", BASE.replace("proposals =", "proposal ="),
     "connections.rw.proposal", "unknown key (did you mean 'proposals'?)"),
    ("unknown child key", BASE.replace('mode = "tunnel"', 'lifetime = 3600'),
     "connections.rw.children.net.lifetime", "unknown key"),
    ("unknown local key", BASE.replace('auth = "psk", id = "gw', 'auth = "psk", idd = "gw'),
     "connections.rw.local.idd", "unknown key (did you mean 'id'?)"),
    ("bad ike proposal",
     BASE.replace('"aes128-sha256-modp2048"', '"aes999-sha256-modp2048"'),
     "connections.rw.proposals[1]", "unknown algorithm 'aes999'"),
    ("esp proposal in ike", BASE.replace('"aes128-sha256-modp2048"', '"aes128gcm16"'),
     "connections.rw.proposals[1]", ""),
    ("bad esp proposal", BASE.replace('["aes256gcm16", "aes128gcm16"]', '["aes256gcm17"]'),
     "connections.rw.children.net.esp_proposals[0]", "unknown algorithm"),
    ("empty proposals", BASE.replace('proposals = ["aes256gcm16-prfsha256-x25519", '
                                     '"aes128-sha256-modp2048"]', "proposals = []"),
     "connections.rw.proposals", "at least one"),
    ("ikev1", BASE.replace("version = 2", "version = 1"),
     "connections.rw.version", "IKEv1 is not supported yet"),
    ("version 3", BASE.replace("version = 2", "version = 3"),
     "connections.rw.version", "must be 2"),
    ("version type", BASE.replace("version = 2", 'version = "2"'),
     "connections.rw.version", "expected an integer, got a string"),
    ("mode", BASE.replace('"tunnel"', '"tunel"'),
     "connections.rw.children.net.mode", "'tunel' is not supported"),
    ("local_ts", BASE.replace('["10.99.2.0/24"]', '["10.99.2.0/24", "10.999.2.0/24"]'),
     "connections.rw.children.net.local_ts[1]", "not an address"),
    ("remote_ts type", BASE.replace('remote_ts = ["10.99.1.0/24"]', 'remote_ts = "10.99.1.0/24"'),
     "connections.rw.children.net.remote_ts", "expected an array of strings, got a string"),
    ("no children",
     BASE[: BASE.index("[connections.rw.children.net]")] + BASE[BASE.index("[secrets.rw]"):],
     "connections.rw.children", "needs at least one child"),
    ("address", BASE.replace('"10.99.0.2"', '"10.99.0.300"'),
     "ike.addresses[0]", "not an IPv4 or IPv6 address"),
    ("address twice", BASE.replace('["10.99.0.2"]', '["10.99.0.2", "10.99.0.2"]'),
     "ike.addresses[1]", "listed twice"),
    ("addresses type", BASE.replace('["10.99.0.2"]', '"10.99.0.2"'),
     "ike.addresses", "expected an array of strings"),
    ("address item type", BASE.replace('["10.99.0.2"]', '["10.99.0.2", 4]'),
     "ike.addresses[1]", "expected a string, got an integer"),
    ("no addresses", BASE.replace('["10.99.0.2"]', "[]"), "ike.addresses", "at least one"),
    ("no node", BASE.replace('[node]\nid = "gw1"\n', ""), "node", "missing (required)"),
    ("no node id", BASE.replace('id = "gw1"\n', ""), "node.id", "missing (required)"),
    ("node id", BASE.replace('id = "gw1"', 'id = "gw 1"'), "node.id", "not a valid node id"),
    ("log level", BASE.replace('id = "gw1"', 'id = "gw1"\nlog_level = "loud"'),
     "node.log_level", "'loud' is not one of"),
    ("port", BASE.replace('addresses = ["10.99.0.2"]', 'addresses = ["10.99.0.2"]\nport = 70000'),
     "ike.port", "not a UDP port"),
    ("same ports", BASE.replace('addresses = ["10.99.0.2"]',
                                'addresses = ["10.99.0.2"]\nport = 4500'),
     "ike.port_nat_t", "must differ"),
    ("legacy type", BASE.replace('addresses = ["10.99.0.2"]',
                                 'addresses = ["10.99.0.2"]\nlegacy_algorithms = "no"'),
     "ike.legacy_algorithms", "expected true or false, got a string"),
    ("half-open", BASE.replace('addresses = ["10.99.0.2"]',
                               'addresses = ["10.99.0.2"]\nhalf_open_timeout = 0'),
     "ike.half_open_timeout", "positive"),
    ("dh_reuse negative", BASE.replace('addresses = ["10.99.0.2"]',
                                       'addresses = ["10.99.0.2"]\ndh_reuse = -1'),
     "ike.dh_reuse", "non-negative"),
    ("dh_reuse long", BASE.replace('addresses = ["10.99.0.2"]',
                                   'addresses = ["10.99.0.2"]\ndh_reuse = "2h"'),
     "ike.dh_reuse", "at most an hour"),
    ("encap", BASE.replace("version = 2", 'version = 2\nencap = "yes"'),
     "connections.rw.encap", "expected true or false"),
    ("remote_addrs", BASE.replace("version = 2", 'version = 2\nremote_addrs = ["peer.test"]'),
     "connections.rw.remote_addrs[0]", "not an IP address, a subnet"),
    ("no connections", BASE[: BASE.index("[connections.rw]")], "connections",
     "no connections defined"),
    ("connection name", BASE.replace("connections.rw", 'connections."r w"'),
     'connections."r w"', "names may only contain"),
    ("connection not a table", BASE[: BASE.index("[connections.rw]")] + "[connections]\nrw = 1\n",
     "connections.rw", "expected a table, got an integer"),
    ("future table type", BASE.replace("[node]", 'worker = "tun0"\n[node]'),
     "worker", "expected a table, got a string"),
    ("no local", BASE.replace('local = { auth = "psk", id = "gw.example.test" }\n', ""),
     "connections.rw.local", "missing (required)"),
    ("auth method", BASE.replace('remote = { auth = "psk"', 'remote = { auth = "eap"'),
     "connections.rw.remote.auth", "'eap' is not supported"),
    ("local id", BASE.replace('id = "gw.example.test"', 'id = "C=CH, XX=y"'),
     "connections.rw.local.id", "unknown DN attribute"),
    ("remote id", BASE.replace('id = "%any" }', 'id = "%anyone" }'),
     "connections.rw.remote.id", "pattern"),
    ("psk with cert", BASE.replace('auth = "psk", id = "gw.example.test"',
                                   'auth = "psk", id = "gw.example.test", cert = "c.pem"'),
     "connections.rw.local.cert", 'only used with auth = "pubkey"'),
    ("psk with cacerts", BASE.replace('{ auth = "psk", id = "%any" }',
                                      '{ auth = "psk", id = "%any", cacerts = ["ca.pem"] }'),
     "connections.rw.remote.cacerts", 'only used with auth = "pubkey" or "eap-tls"'),
    ("pubkey without cert", BASE.replace('auth = "psk", id = "gw', 'auth = "pubkey", id = "gw'),
     "connections.rw.local.cert", "missing (required)"),
    ("pubkey unreadable cert",
     BASE.replace('auth = "psk", id = "gw.example.test"',
                  'auth = "pubkey", cert = "missing.pem", key = "k.pem"'),
     "connections.rw.local.cert", "cannot read 'missing.pem': No such file or directory"),
    ("psk without secrets", NO_SECRETS, "connections.rw.local", "no [secrets] entry"),
    ("psk with unrelated secret",
     BASE.replace('id = "%any" }', 'id = "carol@example.test" }')
     .replace('ids = ["gw.example.test", "%any"]', 'ids = ["dave@example.test"]'),
     "connections.rw.local", "no [secrets] entry"),
    ("secret ids", BASE.replace('ids = ["gw.example.test", "%any"]', "ids = []"),
     "secrets.rw.ids", "at least one"),
    ("secret id", BASE.replace('ids = ["gw.example.test", "%any"]', 'ids = ["%any", "dn:"]'),
     "secrets.rw.ids[1]", "empty"),
    ("two secret sources", BASE.replace(f'secret = "{SECRET}"',
                                        f'secret = "{SECRET}"\nsecret_env = "X"'),
     "secrets.rw.secret_env", "exactly one of secret, secret_env, secret_file"),
    ("no secret source", BASE.replace(f'secret = "{SECRET}"', ""),
     "secrets.rw.secret", "exactly one of"),
    ("secret type", BASE.replace(f'secret = "{SECRET}"', "secret = 77"),
     "secrets.rw.secret", "expected a string, got an integer"),
    ("empty secret", BASE.replace(f'secret = "{SECRET}"', 'secret = ""'),
     "secrets.rw.secret", "empty"),
    ("bad hex secret", BASE.replace(f'secret = "{SECRET}"', f'secret = "0x{SECRET}"'),
     "secrets.rw.secret", "the secret after its '0x' prefix is not valid hex"),
    ("bad base64 secret", BASE.replace(f'secret = "{SECRET}"', f'secret = "0s{SECRET}"'),
     "secrets.rw.secret", "the secret after its '0s' prefix is not valid base64"),
    ("unset env", BASE.replace(f'secret = "{SECRET}"', 'secret_env = "IKE_TEST_UNSET_VAR"'),
     "secrets.rw.secret_env", "environment variable 'IKE_TEST_UNSET_VAR' is not set"),
    ("missing secret file", BASE.replace(f'secret = "{SECRET}"', 'secret_file = "nope.txt"'),
     "secrets.rw.secret_file", "cannot read 'nope.txt': No such file or directory"),
    ("secret key typo", BASE.replace("secret =", "secert ="),
     "secrets.rw.secert", "unknown key (did you mean 'secret'?)"),
    ("vips on a responder connection", edit(("version = 2\n", 'version = 2\nvips = ["0.0.0.0"]\n')),
     "connections.rw.vips", "only for a connection this node initiates"),
    ("a specific vip", edit(("version = 2\n", 'version = 2\nvips = ["10.3.0.7"]\n')),
     "connections.rw.vips[0]", "'10.3.0.7': only \"0.0.0.0\" and \"::\""),
    ("reauth_time below a second", edit(("version = 2\n", 'version = 2\nreauth_time = 0.5\n')),
     "connections.rw.reauth_time", "between a second and 136 years (0: never)"),
    ("unknown unique policy", edit(("version = 2\n", 'version = 2\nunique = "sometimes"\n')),
     "connections.rw.unique", "'sometimes' is not one of \"no\", \"never\", \"replace\", \"keep\""),
    ("mobike not a boolean", edit(("version = 2\n", 'version = 2\nmobike = "no"\n')),
     "connections.rw.mobike", "expected"),
    ("unknown pool", edit(("version = 2\n", 'version = 2\npools = ["rw"]\n')),
     "connections.rw.pools[0]", "no pool 'rw' ([pools.NAME]: none defined)"),
    ("pool without addrs", BASE + "[pools.rw]\ndns = []\n", "pools.rw.addrs", "missing"),
    ("backwards pool range", BASE + '[pools.rw]\naddrs = "10.3.0.9-10.3.0.1"\n',
     "pools.rw.addrs", "is not an address range"),
    ("bad pool dns", BASE + '[pools.rw]\naddrs = "10.3.0.0/24"\ndns = ["ns.example"]\n',
     "pools.rw.dns[0]", "'ns.example' is not an IP address"),
    ("crl_refresh of zero", edit(("[ike]\n", "[ike]\ncrl_refresh = 0\n")),
     "ike.crl_refresh", "between a second and a week"),
    ("ppk_id without its ppk", edit(("version = 2\n", 'version = 2\nppk_id = "pq-1"\n')),
     "connections.rw.ppk_id", "no [secrets.ppk-NAME] entry has this PPK_ID in its ids"),
    ("ppk_required without a ppk", edit(("version = 2\n", 'version = 2\nppk_required = true\n')),
     "connections.rw.ppk_required", "a PPK is required, but no [secrets.ppk-NAME] entry gives"),
    ("a ppk for %any", BASE + '[secrets.ppk-1]\nids = ["%any"]\nsecret = "0x0102"\n',
     "secrets.ppk-1.ids", "a PPK is named by its PPK_IDs; %any names none"),
    ("updown not found", edit(('mode = "tunnel"\n', 'mode = "tunnel"\nupdown = "/nowhere/x"\n')),
     "connections.rw.children.net.updown", "'/nowhere/x' is not an executable file"),
    ("updown not in PATH", edit(('mode = "tunnel"\n', 'mode = "tunnel"\nupdown = "no-such-x"\n')),
     "connections.rw.children.net.updown", "'no-such-x' is not an executable file in PATH"),
    ("updown relative", edit(('mode = "tunnel"\n', 'mode = "tunnel"\nupdown = "bin/x y"\n')),
     "connections.rw.children.net.updown", "give the program's absolute path"),
    ("updown empty", edit(('mode = "tunnel"\n', 'mode = "tunnel"\nupdown = " "\n')),
     "connections.rw.children.net.updown", "an empty command"),
    ("inactivity below a second",
     edit(('mode = "tunnel"\n', 'mode = "tunnel"\ninactivity = 0.5\n')),
     "connections.rw.children.net.inactivity", "between a second and 136 years (0: never)"),
    ("life below rekey",
     edit(('mode = "tunnel"\n', 'mode = "tunnel"\nrekey_bytes = 900\nlife_bytes = 900\n')),
     "connections.rw.children.net.life_bytes", "must be above rekey_bytes (900), or 0 for none"),
    ("negative volume", edit(('mode = "tunnel"\n', 'mode = "tunnel"\nrekey_packets = -1\n')),
     "connections.rw.children.net.rekey_packets", "must be between 0 (none) and 2^63"),
    ("copy_dscp in", edit(('mode = "tunnel"\n', 'mode = "tunnel"\ncopy_dscp = "in"\n')),
     "connections.rw.children.net.copy_dscp",
     "'in' is not supported: the outer DSCP is not copied into received packets"),
    ("copy_dscp unknown", edit(('mode = "tunnel"\n', 'mode = "tunnel"\ncopy_dscp = "off"\n')),
     "connections.rw.children.net.copy_dscp", "'off' is not one of \"out\", \"no\""),
    ("rand above rekey",
     edit(('mode = "tunnel"\n', 'mode = "tunnel"\nrekey_bytes = 900\nrand_bytes = 900\n')),
     "connections.rw.children.net.rand_bytes", "must be below rekey_bytes (900)"),
    ("replay_window zero",
     edit(('mode = "tunnel"\n', 'mode = "tunnel"\nreplay_window = 0\n')),
     "connections.rw.children.net.replay_window", "must be between 1 and 65536 (packets; "
     "anti-replay cannot be turned off)"),
    ("tfc_padding text", edit(('mode = "tunnel"\n', 'mode = "tunnel"\ntfc_padding = "max"\n')),
     "connections.rw.children.net.tfc_padding", 'must be a number of bytes (0-65535) or "mtu"'),
    ("keyingtries negative", BASE.replace("version = 2\n", "version = 2\nkeyingtries = -1\n"),
     "connections.rw.keyingtries", "must be 0 (never give up) or more"),
    ("fragmentation unknown",
     BASE.replace("version = 2\n", 'version = 2\nfragmentation = "maybe"\n'),
     "connections.rw.fragmentation",
     "'maybe' is not one of \"yes\", \"accept\", \"no\", \"force\""),
    ("send_cert unknown", BASE.replace("version = 2\n", 'version = 2\nsend_cert = "yes"\n'),
     "connections.rw.send_cert", "'yes' is not one of \"always\", \"ifasked\", \"never\""),
    ("childless unknown", BASE.replace("version = 2\n", 'version = 2\nchildless = "prefer"\n'),
     "connections.rw.childless", "'prefer' is not one of \"allow\", \"force\", \"never\""),
    ("close_action unknown",
     edit(('mode = "tunnel"\n', 'mode = "tunnel"\nclose_action = "restart"\n')),
     "connections.rw.children.net.close_action",
     "'restart' is not one of \"none\", \"start\", \"trap\""),
    ("close_action trap without one",
     edit(('mode = "tunnel"\n', 'mode = "tunnel"\nclose_action = "trap"\n')),
     "connections.rw.children.net.close_action", '"trap" only with start_action = "trap"'),
    ("copy_ecn a string", edit(('mode = "tunnel"\n', 'mode = "tunnel"\ncopy_ecn = "no"\n')),
     "connections.rw.children.net.copy_ecn", "expected true or false, got a string"),
]


@pytest.mark.parametrize(
    ("content", "key", "reason"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_mistake_is_one_line_naming_file_key_and_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str | bytes, key: str, reason: str
) -> None:
    monkeypatch.delenv("IKE_TEST_UNSET_VAR", raising=False)
    path = write(tmp_path, content)
    message = load_error(path)
    assert "\n" not in message
    prefix = f"{path}: {key}: " if key else f"{path}: "
    assert message.startswith(prefix), message
    assert reason in message[len(prefix):], message
    assert SECRET not in message


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert load_error(path) == f"{path}: cannot read: No such file or directory"


def test_message_names_the_path_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, BASE.replace("version = 2", "version = 1"), "x.toml")
    message = load_error(Path("x.toml"))
    assert message == "x.toml: connections.rw.version: IKEv1 is not supported yet"


def test_secret_file_content_never_in_error(tmp_path: Path) -> None:
    (tmp_path / "psk.bin").write_bytes(SECRET.encode() + b"\xff\xfe")
    path = write(tmp_path, edit((f'secret = "{SECRET}"', 'secret_file = "psk.bin"')))
    message = load_error(path)
    assert message.startswith(f"{path}: secrets.rw.secret_file: 'psk.bin' is not UTF-8")
    assert SECRET not in message


# --- certificate authentication ---------------------------------------------------------

NOW = datetime.datetime.now(datetime.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
    password: bytes | None = None,
) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


KeyMaker = Callable[[], ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey]
KEY_MAKERS: dict[str, KeyMaker] = {
    "ecdsa": lambda: ec.generate_private_key(ec.SECP256R1()),
    "rsa": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
}

PUBKEY = """\
[node]
id = "gw1"
[ike]
addresses = ["10.99.0.2"]
[connections.rw]
local = {{ auth = "pubkey", {local} }}
remote = {{ auth = "pubkey", id = "%any", cacerts = ["pki/ca.pem"] }}
[connections.rw.children.net]
"""


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """ca.pem; gw.pem (leaf, then intermediate) and gw.key; a stranger key."""
    directory = tmp_path / "pki"
    directory.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("Test CA", ca_key, "Test CA", ca_key, ca=True)
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = _cert("Test Intermediate", inter_key, "Test CA", ca_key, ca=True)
    gw_key = ec.generate_private_key(ec.SECP256R1())
    gw = _cert("gw.example.test", gw_key, "Test Intermediate", inter_key, ca=False,
               san=[x509.DNSName("gw.example.test"),
                    x509.IPAddress(ipaddress.ip_address("10.99.0.2"))])
    (directory / "ca.pem").write_bytes(_pem(ca))
    (directory / "gw.pem").write_bytes(_pem(gw) + _pem(inter))
    (directory / "gw.key").write_bytes(_key_pem(gw_key))
    (directory / "stranger.key").write_bytes(_key_pem(ec.generate_private_key(ec.SECP256R1())))
    (directory / "locked.key").write_bytes(_key_pem(gw_key, b"pw"))
    return directory


def test_certificate_auth_loads_chain_key_and_cas(tmp_path: Path, pki: Path) -> None:
    path = write(tmp_path, PUBKEY.format(local='cert = "pki/gw.pem", key = "pki/gw.key"'))
    (conn,) = load_config(path).policy.connections
    local = conn.local
    assert local.method == "pubkey"
    assert local.identity is None  # defaults to the certificate's subject
    assert local.cert is not None and local.key is not None
    assert local.cert.subject.rfc4514_string() == "CN=gw.example.test,O=Test"
    assert [c.subject.rfc4514_string() for c in local.intermediates] == [
        "CN=Test Intermediate,O=Test"
    ]
    assert conn.remote.method == "pubkey"
    assert [c.subject.rfc4514_string() for c in conn.remote.cacerts] == ["CN=Test CA,O=Test"]


@pytest.mark.parametrize("local_id", ["gw.example.test", "10.99.0.2", "O=Test, CN=gw.example.test"])
def test_certificate_auth_accepts_an_id_the_certificate_contains(
    tmp_path: Path, pki: Path, local_id: str
) -> None:
    path = write(tmp_path, PUBKEY.format(
        local=f'id = "{local_id}", cert = "pki/gw.pem", key = "pki/gw.key"'))
    (conn,) = load_config(path).policy.connections
    assert conn.local.identity == parse_identity(local_id)


@pytest.mark.parametrize("kind", sorted(KEY_MAKERS))
def test_certificate_auth_key_types(tmp_path: Path, kind: str) -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = KEY_MAKERS[kind]()
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "ca.pem").write_bytes(_pem(_cert("CA", ca_key, "CA", ca_key, ca=True)))
    (tmp_path / "gw.pem").write_bytes(_pem(_cert("gw", key, "CA", ca_key, ca=False)))
    (tmp_path / "gw.key").write_bytes(_key_pem(key))
    path = write(tmp_path, PUBKEY.format(local='cert = "gw.pem", key = "gw.key"'))
    (conn,) = load_config(path).policy.connections
    assert conn.local.key is not None
    assert conn.local.key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ) == key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_remote_certs_are_pinned_with_or_without_cas(tmp_path: Path, pki: Path) -> None:
    base = PUBKEY.format(local='cert = "pki/gw.pem", key = "pki/gw.key"')
    pinned = base.replace('cacerts = ["pki/ca.pem"]', 'certs = ["pki/gw.pem"]')
    (conn,) = load_config(write(tmp_path, pinned)).policy.connections
    # the file's first certificate (gw.pem holds its intermediate after it)
    assert [c.subject.rfc4514_string() for c in conn.remote.certs] == [
        "CN=gw.example.test,O=Test"]
    assert conn.remote.cacerts == ()
    both = base.replace('cacerts = ["pki/ca.pem"]',
                        'cacerts = ["pki/ca.pem"], certs = ["pki/gw.pem"]')
    (conn,) = load_config(write(tmp_path, both)).policy.connections
    assert len(conn.remote.certs) == 1 and len(conn.remote.cacerts) == 1
    errors = {
        pinned.replace('certs = ["pki/gw.pem"]', "certs = []"):
            "connections.rw.remote.certs: needs at least one certificate file",
        pinned.replace('certs = ["pki/gw.pem"]', 'certs = ["pki/gw.pem"], crls = ["x.crl"]'):
            "connections.rw.remote.crls: only used with cacerts (certs are trusted as they "
            "are)",
        pinned.replace('"pki/gw.pem"]', '"pki/gw.key"]'):
            "connections.rw.remote.certs[0]: 'pki/gw.key' holds no valid certificate: ",
        BASE.replace('remote = { auth = "psk", id = "%any" }',
                     'remote = { auth = "psk", id = "%any", certs = ["pki/gw.pem"] }'):
            'connections.rw.remote.certs: only used with auth = "pubkey"',
    }
    for bad, message in errors.items():
        assert load_error(write(tmp_path, bad)).startswith(
            f"{tmp_path / 'node.toml'}: {message}")


def test_remote_crls_load_pem_and_der(tmp_path: Path, pki: Path) -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    crl = (x509.CertificateRevocationListBuilder().issuer_name(_name("Test CA"))
           .last_update(NOW).next_update(NOW + datetime.timedelta(days=1))
           .add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(77)
                                    .revocation_date(NOW).build())
           .sign(ca_key, hashes.SHA256()))
    (pki / "ca.crl").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    (pki / "ca.der").write_bytes(crl.public_bytes(serialization.Encoding.DER))
    text = PUBKEY.format(local='cert = "pki/gw.pem", key = "pki/gw.key"').replace(
        'cacerts = ["pki/ca.pem"]', 'cacerts = ["pki/ca.pem"], crls = ["pki/ca.crl", "pki/ca.der"]')
    (conn,) = load_config(write(tmp_path, text)).policy.connections
    assert [c.get_revoked_certificate_by_serial_number(77) is not None
            for c in conn.remote.crls] == [True, True]
    bad = text.replace('"pki/ca.der"]', '"pki/gw.pem"]')
    assert load_error(write(tmp_path, bad)).startswith(
        f"{tmp_path / 'node.toml'}: connections.rw.remote.crls[1]: 'pki/gw.pem' holds no "
        "valid CRL: ")
    psk = BASE.replace('remote = { auth = "psk", id = "%any" }',
                       'remote = { auth = "psk", id = "%any", crls = ["x.crl"] }')
    assert load_error(write(tmp_path, psk)).endswith(
        'connections.rw.remote.crls: only used with auth = "pubkey" or "eap-tls"')


def test_remote_revocation_follows_swanctl(tmp_path: Path, pki: Path) -> None:
    text = PUBKEY.format(local='cert = "pki/gw.pem", key = "pki/gw.key"')
    (conn,) = load_config(write(tmp_path, text)).policy.connections
    assert conn.remote.revocation == "relaxed"
    for value in ("strict", "ifuri", "relaxed"):
        strict = text.replace('cacerts = ["pki/ca.pem"]',
                              f'cacerts = ["pki/ca.pem"], revocation = "{value}"')
        (conn,) = load_config(write(tmp_path, strict)).policy.connections
        assert conn.remote.revocation == value
    errors = {
        text.replace('cacerts = ["pki/ca.pem"]', 'cacerts = ["pki/ca.pem"], revocation = "yes"'):
            "connections.rw.remote.revocation: 'yes' is not one of \"relaxed\", \"ifuri\", "
            "\"strict\"",
        text.replace('cacerts = ["pki/ca.pem"]', 'certs = ["pki/gw.pem"], revocation = "strict"'):
            "connections.rw.remote.revocation: only used with cacerts",
        BASE.replace('remote = { auth = "psk", id = "%any" }',
                     'remote = { auth = "psk", id = "%any", revocation = "strict" }'):
            'connections.rw.remote.revocation: only used with auth = "pubkey" or "eap-tls"',
    }
    for bad, message in errors.items():
        assert load_error(write(tmp_path, bad)).startswith(
            f"{tmp_path / 'node.toml'}: {message}")


def test_eap_users_and_their_secrets(tmp_path: Path, pki: Path) -> None:
    text = PUBKEY.format(local='cert = "pki/gw.pem", key = "pki/gw.key"').replace(
        'remote = { auth = "pubkey", id = "%any", cacerts = ["pki/ca.pem"] }',
        'remote = { auth = "eap-mschapv2", eap_id = "*@example.test" }') + (
        '[secrets.eap-carol]\nids = ["carol@example.test"]\nsecret = "c4rol"\n'
        '[secrets.ike-rw]\nids = ["%any", "dave@example.test"]\nsecret = "psk"\n')
    config = load_config(write(tmp_path, text))
    (conn,) = config.policy.connections
    assert conn.remote.method == "eap-mschapv2" and conn.remote.identity.any
    assert conn.remote.eap_id.matches(parse_identity("carol@example.test"))
    assert not conn.remote.eap_id.matches(parse_identity("carol@elsewhere.test"))
    policy = config.policy
    assert policy.find_eap_secret(b"carol@example.test") == b"c4rol"
    assert policy.find_eap_secret(b"dave@example.test") is None  # an IKE PSK is no password
    # the PSK for carol is the %any one: her EAP password never serves as a PSK
    assert policy.find_psk(None, parse_identity("carol@example.test")) == b"psk"
    errors = {
        text.replace('local = { auth = "pubkey", cert = "pki/gw.pem", key = "pki/gw.key" }',
                     'local = { auth = "psk", id = "gw" }'):
            "connections.rw.local: EAP peers need the gateway to authenticate with a "
            'certificate (auth = "pubkey")',
        text.replace('eap_id = "*@example.test"', 'cacerts = ["pki/ca.pem"]'):
            'connections.rw.remote.cacerts: only used with auth = "pubkey" or "eap-tls"',
        text.replace('ids = ["carol@example.test"]', 'ids = ["%any"]'):
            "secrets.eap-carol.ids: an EAP secret needs the user's identity, not only %any",
        text.replace('secret = "c4rol"', 'secret = "0xff00"'):
            "secrets.eap-carol.secret: an EAP password must be UTF-8 text",
    }
    for bad, message in errors.items():
        assert load_error(write(tmp_path, bad)) == f"{tmp_path / 'node.toml'}: {message}"



def test_eap_tls_users_need_our_certificate_and_the_cas_of_theirs(tmp_path: Path,
                                                                   pki: Path) -> None:
    text = PUBKEY.format(local='cert = "pki/gw.pem", key = "pki/gw.key"').replace(
        'remote = { auth = "pubkey", id = "%any", cacerts = ["pki/ca.pem"] }',
        'remote = { auth = "eap-tls", eap_id = "*.example.test", cacerts = ["pki/ca.pem"] }')
    (conn,) = load_config(write(tmp_path, text)).policy.connections
    assert conn.remote.method == "eap-tls" and len(conn.remote.cacerts) == 1
    assert conn.remote.eap_id.matches(parse_identity("client.example.test"))
    errors = {
        text.replace(', cacerts = ["pki/ca.pem"]', ''):
            "connections.rw.remote.cacerts: missing (required)",
        text.replace('local = { auth = "pubkey", cert = "pki/gw.pem", key = "pki/gw.key" }',
                     'local = { auth = "psk", id = "gw" }'):
            "connections.rw.local: EAP peers need the gateway to authenticate with a "
            'certificate (auth = "pubkey")',
    }
    for bad, message in errors.items():
        assert load_error(write(tmp_path, bad)) == f"{tmp_path / 'node.toml'}: {message}"


def test_eap_radius_servers_follow_strongswans_eap_radius(
        tmp_path: Path, pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IKE_TEST_RADIUS", "0x0a0b")
    text = PUBKEY.format(local='cert = "pki/gw.pem", key = "pki/gw.key"').replace(
        'remote = { auth = "pubkey", id = "%any", cacerts = ["pki/ca.pem"] }',
        'remote = { auth = "eap-radius", eap_id = "*@example.test" }') + (
        '[radius]\nnas_identifier = "vpn-gw"\nretransmit_tries = 2\n'
        'accounting = true\naccounting_interval = "10m"\n'
        '[radius.servers.first]\naddress = "10.9.0.1"\nsecret = "s3cret"\n'
        '[radius.servers.second]\naddress = "fd00::9"\nauth_port = 11812\n'
        'secret_env = "IKE_TEST_RADIUS"\n')
    config = load_config(write(tmp_path, text))
    (conn,) = config.policy.connections
    assert conn.remote.method == "eap-radius"
    assert conn.remote.eap_id.matches(parse_identity("carol@example.test"))
    assert conn.remote.groups == ()
    grouped = text.replace('eap_id = "*@example.test"',
                           'eap_id = "*@example.test", groups = ["admins", "net ops"]')
    (conn,) = load_config(write(tmp_path, grouped)).policy.connections
    assert conn.remote.groups == ("admins", "net ops")
    radius = config.policy.radius
    assert radius is not None
    assert [(s.name, s.address, s.port, s.secret) for s in radius.servers] == [
        ("first", "10.9.0.1", 1812, b"s3cret"), ("second", "fd00::9", 11812, b"\x0a\x0b")]
    assert (radius.nas_identifier, radius.timeout, radius.base, radius.tries) == (
        "vpn-gw", 2.0, 1.4, 2)
    assert (radius.accounting, radius.accounting_interval) == (True, 600.0)
    assert "s3cret" not in repr(config)
    assert radius.dae is None
    with_dae = text + '[radius.dae]\nlisten = "10.99.0.2"\nsecret = "d4e"\n'
    dae = load_config(write(tmp_path, with_dae)).policy.radius.dae  # type: ignore[union-attr]
    assert dae is not None and (dae.host, dae.port, dae.secret) == ("10.99.0.2", 3799, b"d4e")
    assert "d4e" not in repr(dae)
    with_pool = text.replace("[connections.rw]\n", "[connections.rw]\npools = [\"radius\"]\n", 1)
    (conn,) = load_config(write(tmp_path, with_pool)).policy.connections
    assert [type(p).__name__ for p in conn.pools] == ["FramedPool"]
    start = text.index("[radius]")
    errors = {
        text[:start]: 'connections.rw.remote.auth: "eap-radius" needs a [radius] table with '
                      "its servers",
        text[:start] + "[radius]\n": "radius.servers: needs at least one [radius.servers.NAME]",
        text.replace('"10.9.0.1"', '"radius.example"'):
            "radius.servers.first.address: 'radius.example' is not an IP address",
        text.replace('secret = "s3cret"\n', ""):
            "radius.servers.first.secret: give exactly one of secret, secret_env, secret_file",
        text.replace("retransmit_tries = 2", "retransmit_tries = 0"):
            "radius.retransmit_tries: must be between 1 and 20",
        text.replace('"10m"', '"30s"'):
            "radius.accounting_interval: 0 (none), or from a minute to a day",
        with_pool.replace('auth = "eap-radius"', 'auth = "eap-mschapv2"'):
            'connections.rw.pools[0]: "radius" (the RADIUS server\'s Framed-IP-Address) '
            'needs remote auth = "eap-radius"',
        with_dae.replace('listen = "10.99.0.2"', 'listen = "gw:3799"'):
            "radius.dae.listen: 'gw' is not an IPv4 or IPv6 address",
        with_dae.replace('secret = "d4e"\n', ""):
            "radius.dae.secret: give exactly one of secret, secret_env, secret_file",
        with_pool + '[pools.radius]\naddrs = "10.3.0.0/24"\n':
            'pools.radius: "radius" names the addresses a RADIUS server assigns; choose '
            "another name",
        text.replace('remote = { auth = "eap-radius"', 'remote = { auth = "eap-radius", '
                     'cacerts = ["pki/ca.pem"]'):
            'connections.rw.remote.cacerts: only used with auth = "pubkey" or "eap-tls"',
        grouped.replace('auth = "eap-radius"', 'auth = "eap-mschapv2"'):
            "connections.rw.remote.groups: group memberships come from a RADIUS server's "
            'Class attributes: only with auth = "eap-radius"',
        grouped.replace('"net ops"', '""'): "connections.rw.remote.groups: a group name is empty",
    }
    for bad, message in errors.items():
        assert load_error(write(tmp_path, bad)) == f"{tmp_path / 'node.toml'}: {message}"

CERT_ERRORS = [
    ("id not in cert", 'id = "other.example.test", cert = "pki/gw.pem", key = "pki/gw.key"',
     "connections.rw.local.id", "'other.example.test' is not contained in the certificate"),
    ("wrong key", 'cert = "pki/gw.pem", key = "pki/stranger.key"',
     "connections.rw.local.key", "does not belong to the certificate"),
    ("encrypted key", 'cert = "pki/gw.pem", key = "pki/locked.key"',
     "connections.rw.local.key", "'pki/locked.key' is encrypted"),
    ("key is a cert", 'cert = "pki/gw.pem", key = "pki/ca.pem"',
     "connections.rw.local.key", "'pki/ca.pem' holds no valid private key"),
    ("cert is a key", 'cert = "pki/gw.key", key = "pki/gw.key"',
     "connections.rw.local.cert", "'pki/gw.key' holds no valid certificate"),
    ("missing key", 'cert = "pki/gw.pem"', "connections.rw.local.key", "missing (required)"),
    ("unreadable key", 'cert = "pki/gw.pem", key = "pki/none.key"',
     "connections.rw.local.key", "cannot read 'pki/none.key': No such file or directory"),
]


@pytest.mark.parametrize(
    ("local", "key", "reason"), [c[1:] for c in CERT_ERRORS], ids=[c[0] for c in CERT_ERRORS]
)
def test_certificate_mistakes(
    tmp_path: Path, pki: Path, local: str, key: str, reason: str
) -> None:
    path = write(tmp_path, PUBKEY.format(local=local))
    message = load_error(path)
    assert "\n" not in message
    assert message.startswith(f"{path}: {key}: {reason}"), message


@pytest.mark.parametrize(
    ("cacerts", "key", "reason"),
    [
        ("[]", "connections.rw.remote.cacerts", "needs at least one CA certificate"),
        ('["pki/nope.pem"]', "connections.rw.remote.cacerts[0]", "cannot read 'pki/nope.pem'"),
    ],
)
def test_remote_pubkey_needs_readable_cacerts(
    tmp_path: Path, pki: Path, cacerts: str, key: str, reason: str
) -> None:
    text = PUBKEY.format(local='cert = "pki/gw.pem", key = "pki/gw.key"').replace(
        '["pki/ca.pem"]', cacerts
    )
    message = load_error(write(tmp_path, text))
    assert message.startswith(f"{tmp_path / 'node.toml'}: {key}: {reason}"), message


def test_pubkey_connection_needs_no_secret(tmp_path: Path, pki: Path) -> None:
    path = write(tmp_path, PUBKEY.format(local='cert = "pki/gw.pem", key = "pki/gw.key"'))
    config: NodeConfig = load_config(path)
    assert config.policy.secrets == ()


# --- [worker] -------------------------------------------------------------------------------


EXAMPLE = REPO / "config" / "example.toml"


def _without_worker() -> str:
    return EXAMPLE.read_text().split("[worker]")[0]


def _with_worker(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "worker.toml"
    path.write_text(_without_worker() + "\n[worker]\n" + body)
    return path


def test_worker_table_is_parsed_with_defaults(tmp_path: Path) -> None:
    config = load_config(_with_worker(tmp_path, 'tun = "ikec7"\nmtu = 1380\n'))
    assert config.worker is not None
    assert (config.worker.tun, config.worker.mtu, config.worker.table) == ("ikec7", 1380, 1450)
    assert config.worker.replay_window == 1024 and config.worker.lifetime_bytes is None


def test_no_worker_table_means_no_data_plane(tmp_path: Path) -> None:
    path = tmp_path / "ike-only.toml"
    path.write_text(_without_worker())
    assert load_config(path).worker is None


@pytest.mark.parametrize(("body", "key", "reason"), [
    ('tun = "a-name-that-is-too-long"', "worker.tun", "valid interface name"),
    ("mtu = 100", "worker.mtu", "between 576"),
    ("table = 254", "worker.table", "main and local"),
    ("replay_window = 0", "worker.replay_window", "between 1"),
    ("lifetime_bytes = -1", "worker.lifetime_bytes", "negative"),
    ("tunnel = 1", "worker.tunnel", "unknown"),
])
def test_bad_worker_settings_name_the_key(tmp_path: Path, body: str, key: str,
                                          reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_with_worker(tmp_path, body + "\n"))
    message = str(info.value)
    assert key in message and reason in message and "\n" not in message


# --- lifetimes, DPD and retransmission ------------------------------------------------------


def _example_with(tmp_path: Path, connection: str = "", child: str = "", ike: str = "") -> Path:
    text = _without_worker()
    text = text.replace("[connections.rw]\n", "[connections.rw]\n" + connection)
    text = text.replace("[connections.rw.children.net]\n",
                        "[connections.rw.children.net]\n" + child)
    text = text.replace("[ike]\n", "[ike]\n" + ike)
    path = tmp_path / "lifetimes.toml"
    path.write_text(text)
    return path


def test_lifetimes_default_to_swanctls(tmp_path: Path) -> None:
    config = load_config(_example_with(tmp_path))
    conn = config.policy.connections[0]
    assert conn.lifetime.rekey_time == 14400 and conn.lifetime.hard == pytest.approx(15840)
    assert conn.children[0].lifetime.rekey_time == 3600
    assert conn.dpd_delay == 0 and conn.dpd_action == "clear"
    assert config.policy.retransmission.timeout == 4.0
    assert config.policy.retransmission.tries == 5


def test_lifetimes_dpd_and_retransmission_are_read(tmp_path: Path) -> None:
    config = load_config(_example_with(
        tmp_path,
        connection='rekey_time = "1h"\nover_time = "10m"\ndpd_delay = "2s"\n',
        child='rekey_time = 20\nlife_time = "30s"\nrand_time = 5\n',
        ike="retransmit_timeout = 1.5\nretransmit_tries = 3\n"))
    conn = config.policy.connections[0]
    assert (conn.lifetime.rekey_time, conn.lifetime.hard) == (3600, 4200)
    assert conn.dpd_delay == 2.0
    lifetime = conn.children[0].lifetime
    assert (lifetime.rekey_time, lifetime.hard, lifetime.jitter) == (20, 30, 5)
    assert (config.policy.retransmission.timeout, config.policy.retransmission.tries) == (1.5, 3)
    assert config.policy.keep_alive == 20.0
    assert load_config(_example_with(tmp_path, ike='keep_alive = "45s"\n')).policy.keep_alive == 45
    assert load_config(_example_with(tmp_path, ike="keep_alive = 0\n")).policy.keep_alive == 0


@pytest.mark.parametrize(("connection", "child", "ike", "key", "reason"), [
    ('rekey_time = "soon"\n', "", "", "connections.rw.rekey_time", "not a duration"),
    ("rekey_time = -5\n", "", "", "connections.rw.rekey_time", "non-negative"),
    ("", "rekey_time = 60\nlife_time = 30\n", "", "children.net.life_time", "exceed"),
    ("", "rekey_time = 60\nrand_time = 90\n", "", "children.net.rand_time", "below"),
    ('dpd_action = "restart"\n', "", "", "connections.rw.dpd_action",
     'needs a child with start_action = "start" or "trap"'),
    ('dpd_action = "hold"\n', "", "", "connections.rw.dpd_action",
     "'hold' is not one of \"clear\", \"restart\", \"trap\""),
    ("", "", "retransmit_tries = 99\n", "ike.retransmit_tries", "between 0 and 20"),
    ("", "", 'keep_alive = "2h"\n', "ike.keep_alive", "at most an hour"),
    ("", "", 'keep_alive = "often"\n', "ike.keep_alive", "not a duration"),
])
def test_bad_lifetime_settings_name_the_key(tmp_path: Path, connection: str, child: str,
                                            ike: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_example_with(tmp_path, connection, child, ike))
    message = str(info.value)
    assert key in message and reason in message and "\n" not in message


# --- [cluster] ---------------------------------------------------------------------------------


def _with_cluster(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(_without_worker() + "\n[cluster]\n" + body)
    return path


def test_cluster_table_defaults_and_key_file_relative_to_the_config(tmp_path: Path) -> None:
    config = load_config(_with_cluster(tmp_path, 'store = "redis://127.0.0.1:6379/0"\n'
                                                 'key = "cluster.key"\n'))
    cluster = config.cluster
    assert cluster is not None
    assert cluster.key == str(tmp_path / "cluster.key")
    assert cluster.relay == "0.0.0.0:4800" and cluster.advertise is None
    assert cluster.membership_ttl == 5.0


def test_node_id_hostname_is_the_host_name(tmp_path: Path) -> None:
    path = _with_cluster(tmp_path, 'relay = "[::1]:4801"\nadvertise = "[::1]"\n')
    path.write_text(path.read_text().replace('id = "gw1"', 'id = "%hostname"'))
    config = load_config(path)
    assert config.node_id and config.node_id != "%hostname"
    assert "." not in config.node_id
    assert config.cluster is not None and config.cluster.advertise == "[::1]:4801"


@pytest.mark.parametrize(("body", "key", "reason"), [
    ('store = "mysql://db"\n', "cluster.store", "not one of"),
    ('store = "redis://r"\n', "cluster.key", "needs the cluster key"),
    ('relay = "10.0.0.1:99999"\n', "cluster.relay", "not a TCP port"),
    ('advertise = "0.0.0.0:4800"\n', "cluster.advertise", "others can send to"),
    ('membership_ttl = "0.1s"\n', "cluster.membership_ttl", "between 0.5 s"),
    ('redis = "redis://r"\n', "cluster.redis", "unknown"),
])
def test_bad_cluster_settings_name_the_key(tmp_path: Path, body: str, key: str,
                                           reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_with_cluster(tmp_path, body))
    message = str(info.value)
    assert key in message and reason in message and "\n" not in message


def test_a_certificate_whose_names_do_not_decode_is_one_line(tmp_path: Path, pki: Path) -> None:
    """A commonName with an ASN.1 type its OID cannot have (here a BIT STRING)."""
    der = x509.load_pem_x509_certificate((pki / "gw.pem").read_bytes()).public_bytes(
        serialization.Encoding.DER)
    utf8 = bytes([0x0C, len(b"Test Intermediate")]) + b"Test Intermediate"
    assert der.count(utf8) == 1  # the issuer's commonName
    (pki / "garbled.der").write_bytes(der.replace(utf8, b"\x03" + utf8[1:]))
    path = write(tmp_path, PUBKEY.format(local='cert = "pki/garbled.der", key = "pki/gw.key"'))
    message = load_error(path)
    assert "\n" not in message
    assert message.startswith(
        f"{path}: connections.rw.local.cert: 'pki/garbled.der' holds no valid certificate"
    ), message
