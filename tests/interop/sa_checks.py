"""Assertions on what strongSwan reports, shared by the interop tests."""

from __future__ import annotations

import subprocess
from typing import Any

from tests.interop.charon import Charon


def established(charon: Charon) -> list[dict[str, Any]]:
    return [sa for sa in charon.list_sas() if sa.get("state") == "ESTABLISHED"]


def assert_initiated(result: subprocess.CompletedProcess[str], charon: Charon) -> dict[str, Any]:
    """The initiate succeeded and exactly one IKE SA is ESTABLISHED; return it."""
    assert result.returncode == 0, f"swanctl --initiate failed:\n{result.stdout}{result.stderr}"
    sas = established(charon)
    assert len(sas) == 1, f"expected one ESTABLISHED IKE SA, strongSwan lists {charon.list_sas()}"
    return sas[0]


def assert_not_established(result: subprocess.CompletedProcess[str], charon: Charon) -> None:
    assert result.returncode != 0, f"initiate unexpectedly succeeded:\n{result.stdout}"
    assert established(charon) == [], f"unexpected SA: {charon.list_sas()}"


def child_sa(sa: dict[str, Any], name: str = "net") -> dict[str, Any]:
    """The one CHILD_SA called ``name`` of an IKE SA dict."""
    children = [c for c in sa.get("child-sas", {}).values() if c.get("name") == name]
    assert len(children) == 1, f"expected one CHILD_SA {name!r}, got {sa.get('child-sas')}"
    result: dict[str, Any] = children[0]
    return result


def algorithm(sa: dict[str, Any]) -> str:
    """strongSwan's way of writing an SA's cipher, e.g. ``AES_GCM_16-256``."""
    alg = str(sa["encr-alg"])
    return f"{alg}-{sa['encr-keysize']}" if "encr-keysize" in sa else alg
