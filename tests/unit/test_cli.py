"""The ike-cluster command: exit codes and output of check-config, run's wiring, --version."""

from __future__ import annotations

import gc
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import types
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from cluster import __version__, cli
from cluster.config import NodeConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "example.toml"


def ike_cluster(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH: the checkout's package, even when it is not installed in this venv
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "cluster", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_ok_prints_path_and_connection_count() -> None:
    result = ike_cluster("check-config", "config/example.toml")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "config/example.toml: OK (1 connections)\n"
    assert result.stderr == ""


def test_check_config_error_is_one_line_on_stderr_with_status_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        EXAMPLE.read_text().replace("aes128-sha256-modp2048", "aes999-sha256-modp2048")
    )
    result = ike_cluster("check-config", "bad.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "bad.toml: connections.rw.proposals[1]: unknown algorithm 'aes999'\n"
    )


def test_check_config_missing_file_status_2(tmp_path: Path) -> None:
    result = ike_cluster("check-config", "absent.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "absent.toml: cannot read: No such file or directory\n"


def test_check_config_error_never_shows_the_secret(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        EXAMPLE.read_text().replace('secret = "change-me"', 'secret = "0xchange-me"')
    )
    result = ike_cluster("check-config", str(bad))
    assert result.returncode == 2
    assert result.stderr.startswith(f"{bad}: secrets.rw.secret: ")
    assert "change-me" not in result.stderr


def test_run_with_bad_config_exits_2_before_starting(tmp_path: Path) -> None:
    result = ike_cluster("run", "--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 2
    assert result.stderr == f"{tmp_path / 'absent.toml'}: cannot read: No such file or directory\n"


def test_version() -> None:
    result = ike_cluster("--version")
    assert result.returncode == 0
    assert result.stdout == f"ike-cluster {__version__}\n"


@pytest.mark.parametrize("args", [[], ["run"], ["frobnicate"], ["run", "--log-level", "loud"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = ike_cluster(*args)
    assert result.returncode == 2
    assert "usage: ike-cluster" in result.stderr


# --- run, with the runtime replaced by a fake ---------------------------------------------


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """Undo what `run` does to the root logger, so other tests keep pytest's handlers."""
    root = logging.getLogger()
    handlers, level, show = list(root.handlers), root.level, warnings.showwarning
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)
    warnings.showwarning = show


@pytest.fixture(autouse=True)
def collector() -> Iterator[None]:
    """Undo what `run` does to the garbage collector (tune_gc) for the tests after."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.fixture
def ike_only(tmp_path: Path) -> Path:
    """The example without its [worker] table and control socket: `run` then calls only
    run_node (faked)."""
    path = tmp_path / "ike-only.toml"
    text = EXAMPLE.read_text().split("[worker]")[0]
    assert "[node]\n" in text
    path.write_text(text.replace("[node]\n", "[node]\ncontrol = false\n", 1))
    return path


def fake_runtime(monkeypatch: pytest.MonkeyPatch, behaviour: BaseException | None) -> list[object]:
    calls: list[object] = []

    async def run_node(
        config: NodeConfig, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        calls.append(config)
        await trio.sleep(0)
        if behaviour is not None:
            raise behaviour

    module = types.ModuleType("cluster.runtime.node")
    module.run_node = run_node  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cluster.runtime.node", module)
    return calls


def test_run_loads_config_sets_logging_and_runs_the_node(
    ike_only: Path, monkeypatch: pytest.MonkeyPatch, root_logger: logging.Logger
) -> None:
    calls = fake_runtime(monkeypatch, None)
    assert cli.main(["run", "--config", str(ike_only)]) == 0
    (config,) = calls
    assert isinstance(config, NodeConfig) and config.node_id == "gw1"
    assert root_logger.level == logging.INFO
    added = [h for h in root_logger.handlers if isinstance(h, logging.StreamHandler)]
    assert any(
        h.formatter is not None and h.formatter._fmt == cli.LOG_FORMAT for h in added
    )


def test_run_logs_library_warnings_as_lines_of_its_own_format(
    ike_only: Path, monkeypatch: pytest.MonkeyPatch, root_logger: logging.Logger,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake_runtime(monkeypatch, None)
    assert cli.main(["run", "--config", str(ike_only)]) == 0
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("an odd certificate name", UserWarning, stacklevel=1)
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "an odd certificate name" in line]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING py\.warnings: "
                        r"UserWarning: an odd certificate name \(.*test_cli\.py:\d+\)", line), line


def test_run_freezes_start_up_objects_and_collects_less_often(
    ike_only: Path, monkeypatch: pytest.MonkeyPatch, root_logger: logging.Logger
) -> None:
    fake_runtime(monkeypatch, None)
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    assert cli.main(["run", "--config", str(ike_only)]) == 0
    assert gc.get_threshold() == cli.GC_THRESHOLDS
    assert gc.get_freeze_count() > 1000  # the modules and the configuration loaded so far


def test_run_log_level_option_overrides_the_file(
    ike_only: Path, monkeypatch: pytest.MonkeyPatch, root_logger: logging.Logger
) -> None:
    fake_runtime(monkeypatch, None)
    assert cli.main(["run", "--config", str(ike_only), "--log-level", "debug"]) == 0
    assert root_logger.level == logging.DEBUG


def test_run_keyboard_interrupt_exits_130_without_traceback(
    ike_only: Path, monkeypatch: pytest.MonkeyPatch, root_logger: logging.Logger,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake_runtime(monkeypatch, KeyboardInterrupt())
    assert cli.main(["run", "--config", str(ike_only)]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_run_os_error_is_logged_as_one_line_and_exits_1(
    ike_only: Path, monkeypatch: pytest.MonkeyPatch, root_logger: logging.Logger,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake_runtime(monkeypatch, OSError(98, "Address already in use"))
    assert cli.main(["run", "--config", str(ike_only)]) == 1
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        "[Errno 98] Address already in use"
    ]


def test_run_other_errors_are_not_swallowed(
    ike_only: Path, monkeypatch: pytest.MonkeyPatch, root_logger: logging.Logger
) -> None:
    fake_runtime(monkeypatch, RuntimeError("bug"))
    with pytest.raises(RuntimeError, match="bug"):
        cli.main(["run", "--config", str(ike_only)])


# --- run, for real: start on loopback, stop with a signal ------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_run_serves_until_signal_then_exits_0_without_traceback(
    tmp_path: Path, signum: signal.Signals
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        EXAMPLE.read_text().replace(
            'addresses = ["10.99.0.2"]', 'addresses = ["127.0.0.1"]\nport = 0\nport_nat_t = 0'
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen(
        [sys.executable, "-m", "cluster", "run", "--config", str(config)],
        stderr=subprocess.PIPE, text=True, env=env,
    ) as proc:
        stderr = proc.stderr
        assert stderr is not None
        lines: queue.Queue[str] = queue.Queue()

        def read_lines() -> None:  # a thread, so waiting for a line can time out
            for line in stderr:
                lines.put(line)

        reader = threading.Thread(target=read_lines, daemon=True)
        reader.start()
        seen: list[str] = []
        while not any("listening on" in line for line in seen):
            try:
                seen.append(lines.get(timeout=30))
            except queue.Empty:
                proc.kill()
                pytest.fail(f"node did not start: {''.join(seen)}")
        proc.send_signal(signum)
        proc.wait(timeout=30)
        reader.join(timeout=30)
    while not lines.empty():
        seen.append(lines.get())
    log = "".join(seen)
    assert proc.returncode == 0, log
    assert "Traceback" not in log
    assert f"{signum.name} received; shutting down" in log
    # the configured format: time, level, logger name, message
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO cluster\.\S+: node gw1 ", log,
                     re.MULTILINE), log


def test_line_formatter_writes_what_the_standard_formatter_writes() -> None:
    ours, standard = cli.LineFormatter(), logging.Formatter(cli.LOG_FORMAT)
    for created in (1700000000.0, 1700000000.25, 1700000000.999, 1700000001.5, 1699999999.0,
                    1700086400.125):
        record = logging.LogRecord("cluster.x", logging.INFO, __file__, 1, "SA %s up",
                                   ("abc",), None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert ours.format(record) == standard.format(record)
