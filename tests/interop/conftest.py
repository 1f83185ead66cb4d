"""Fixtures for interop tests: a fresh lab per test, a throw-away PKI per session.

Interop tests need root, iproute2 and strongSwan. Without them they are skipped
locally, but fail under CI=true so a broken CI image cannot pass silently.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path

import pytest

from tests.interop.certs import Pki, make_pki
from tests.interop.charon import CHARON, SWANCTL, Charon
from tests.interop.lab import RESPONDER_V4, Conn, Lab
from tests.interop.responders import (
    CharonResponder,
    Responder,
    StartResponder,
    responder_kind,
)

REQUIRED_TOOLS = (CHARON, SWANCTL, "ip", "ss", "mount")


def missing_prerequisites() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("not running as root (network namespaces need it)")
    problems += [f"{tool} not found" for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    return problems


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("interop") is None:
        return
    problems = missing_prerequisites()
    if problems:
        message = "interop test needs root, iproute2 and strongSwan: " + "; ".join(problems)
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report = outcome.get_result()
    lab = getattr(item, "funcargs", {}).get("lab")
    if report.failed and isinstance(lab, Lab):
        # The daemons' logs are what explains an interop failure.
        report.sections.append(("lab logs", lab.logs()))


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with Lab(tmp_path / "lab") as the_lab:
        yield the_lab


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def start_responder(lab: Lab) -> StartResponder:
    """``start_responder(conns, addresses=...)`` starts our node in the responder netns
    (or strongSwan when IKC_INTEROP_RESPONDER=charon)."""

    def start(conns: Sequence[Conn], *, addresses: Sequence[str] = (RESPONDER_V4,)) -> Responder:
        if responder_kind() == "charon":
            charon = lab.charon("responder")
            charon.load(*conns)
            return CharonResponder(charon)
        return lab.node(conns, addresses=addresses)

    return start


@pytest.fixture
def initiator(lab: Lab) -> Charon:
    """strongSwan in the initiator namespace, started, nothing loaded yet."""
    return lab.charon("initiator")
