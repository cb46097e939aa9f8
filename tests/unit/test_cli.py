"""broker.cli (and tools.meshctl, broker.logs as the CLI sets them up): options, exit codes, errors."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import cli
from broker.config import Config, LoggingConfig, StoreType
from broker.logs import configure_logging
from mesh.curve import generate
from tools import meshctl

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_supervisor(monkeypatch: pytest.MonkeyPatch) -> list[Config]:
    """Stands in for broker.supervisor: records the config `run_node` gets instead of starting a node."""
    started: list[Config] = []

    def run_node(config: Config) -> int:
        started.append(config)
        return 0

    module = types.ModuleType("broker.supervisor")
    module.run_node = run_node  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "broker.supervisor", module)
    monkeypatch.setattr(cli, "configure_logging", lambda cfg, name: None)
    return started


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in root.handlers:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logging.getLogger("test.cli.quiet").setLevel(logging.NOTSET)
    logging.captureWarnings(False)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "meshmq.yaml"
    path.write_text(text)
    return str(path)


# --- help and parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_exits_0_and_lists_the_options(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([flag]) == 0
    out = capsys.readouterr().out
    for option in ("-config", "--config", "-log", "-workers", "-port", "-cluster", "--cluster"):
        assert re.search(rf"(^|[\s,]){option}\b", out), option


@pytest.mark.parametrize(
    "argv",
    [
        ["-config", "f.yaml", "-log", "DEBUG", "-workers", "3", "-port", "1884", "-cluster"],
        ["--config", "f.yaml", "--log", "DEBUG", "--workers", "3", "--port", "1884", "--cluster"],
        ["-config=f.yaml", "-log=DEBUG", "-workers=3", "-port=1884", "-cluster"],
        ["--config=f.yaml", "--log=DEBUG", "--workers=3", "--port=1884", "--cluster"],
    ],
)
def test_both_spellings_parse_alike(argv: list[str]) -> None:
    args = cli.build_parser().parse_args(argv)
    assert (args.config, args.log, args.workers, args.port, args.cluster) == (
        "f.yaml",
        "DEBUG",
        3,
        1884,
        True,
    )


def test_options_left_out_are_none() -> None:
    args = cli.build_parser().parse_args([])
    assert (args.config, args.log, args.workers, args.port, args.cluster) == (None, None, None, None, None)


def test_non_integer_workers_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["-workers", "many"]) == 2
    assert "-workers" in capsys.readouterr().err


# --- configuration errors -----------------------------------------------------------------------


def test_bad_config_exits_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "MQTT:\n  MaxInflight: abc\n")
    assert cli.main(["-config", path]) == 2
    assert capsys.readouterr().err == (
        "meshmq: config error: MQTT.MaxInflight: must be an integer from 1 to 65535, got 'abc'\n"
    )


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([f"--config={tmp_path / 'absent.yaml'}"]) == 2
    assert "absent.yaml: cannot read" in capsys.readouterr().err


def test_bad_override_exits_2_naming_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["-log", "LOUD"]) == 2
    assert capsys.readouterr().err.startswith("meshmq: config error: Logging.Level (-log): must be one of")
    assert cli.main(["-port", "70000"]) == 2
    assert "TCP (-port)" in capsys.readouterr().err


def test_cluster_needs_postgres(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["-cluster"]) == 2
    assert capsys.readouterr().err == "meshmq: cluster mode requires SessionStore.Type: POSTGRES\n"


POSTGRES = "SessionStore:\n  Type: POSTGRES\n"


def test_cluster_needs_a_key_file_or_plaintext(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_supervisor: list[Config]
) -> None:
    path = write(tmp_path, POSTGRES)
    assert cli.main(["--cluster", "-config", path]) == 2
    assert capsys.readouterr().err == (
        "meshmq: cluster mode needs Mesh.Curve.KeyFile (make keys with `meshctl keygen`) "
        "or Mesh.Plaintext: true\n"
    )
    assert fake_supervisor == []


def test_cluster_enabled_in_the_file_is_cluster_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_supervisor: list[Config]
) -> None:
    path = write(tmp_path, "Cluster:\n  Enabled: true\n")
    assert cli.main(["-config", path]) == 2
    assert capsys.readouterr().err == "meshmq: cluster mode requires SessionStore.Type: POSTGRES\n"
    assert fake_supervisor == []


def test_cluster_starts_in_plaintext(tmp_path: Path, fake_supervisor: list[Config]) -> None:
    path = write(tmp_path, POSTGRES + "Mesh:\n  Plaintext: true\n")
    assert cli.main(["-cluster", "-config", path]) == 0
    [config] = fake_supervisor
    assert config.cluster and config.mesh.plaintext


def test_cluster_starts_with_a_good_key_file(tmp_path: Path, fake_supervisor: list[Config]) -> None:
    _, secret_path = generate(str(tmp_path), "cluster")
    path = write(
        tmp_path, POSTGRES + f"Cluster:\n  Enabled: true\nMesh:\n  Curve:\n    KeyFile: {secret_path}\n"
    )
    assert cli.main(["-config", path]) == 0
    [config] = fake_supervisor
    assert config.cluster and config.mesh.curve.key_file == secret_path


def test_cluster_refuses_a_key_file_that_does_not_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_supervisor: list[Config]
) -> None:
    public_path, _ = generate(str(tmp_path), "cluster")
    missing = tmp_path / "nope.key_secret"
    for key_file, problem in ((missing, "no such key file"), (public_path, "holds only a public key")):
        path = write(tmp_path, POSTGRES + f"Mesh:\n  Plaintext: true\n  Curve:\n    KeyFile: {key_file}\n")
        assert cli.main(["-cluster", "-config", path]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"meshmq: Mesh.Curve: {key_file}: {problem}")
    assert fake_supervisor == []


def test_cluster_refuses_own_key_missing_from_the_allowed_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_supervisor: list[Config]
) -> None:
    _, secret_path = generate(str(tmp_path / "own"), "n1")
    generate(str(tmp_path / "allowed"), "n2")
    path = write(
        tmp_path,
        POSTGRES
        + f"Mesh:\n  Curve:\n    KeyFile: {secret_path}\n    AllowedKeysDir: {tmp_path / 'allowed'}\n",
    )
    assert cli.main(["-cluster", "-config", path]) == 2
    assert "is not among the allowed keys" in capsys.readouterr().err
    assert fake_supervisor == []


def test_cluster_refusal_outside_cluster_mode_is_none() -> None:
    assert cli._cluster_refusal(Config(node_name="n")) is None


def test_bad_config_through_python_m(tmp_path: Path) -> None:
    path = write(tmp_path, "MQTT:\n  Bogus: 1\n")
    done = subprocess.run(
        [sys.executable, "-m", "broker.cli", "-config", path],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("meshmq: config error: MQTT.Bogus: unknown key")


# --- a valid configuration starts the node --------------------------------------------------------


def test_valid_config_and_overrides_reach_run_node(tmp_path: Path, fake_supervisor: list[Config]) -> None:
    path = write(tmp_path, "Workers: 2\nTCP: 1884\nSessionStore:\n  Type: MEMORY\n")
    assert cli.main(["-config", path, "--port", "1999", "-log", "warning"]) == 0
    [config] = fake_supervisor
    assert (config.workers, config.tcp_port, config.cluster) == (2, 1999, False)
    assert config.session_store.type is StoreType.MEMORY
    assert config.logging.level == "WARNING"


def test_no_config_file_means_defaults(fake_supervisor: list[Config]) -> None:
    assert cli.main([]) == 0
    assert fake_supervisor == [Config(node_name=fake_supervisor[0].node_name)]


# --- logging as the CLI configures it -------------------------------------------------------------

LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (?P<level>\w+) +(?P<proc>\S+) (?P<logger>\S+): (?P<msg>.*)$"
)


def test_log_line_format_and_levels(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LoggingConfig(level="INFO", loggers=(("test.cli.quiet", "ERROR"),)), "worker-1")
    logging.getLogger("test.cli.loud").info("hello %s", "there")
    logging.getLogger("test.cli.loud").debug("below the root level")
    logging.getLogger("test.cli.quiet").warning("below this logger's level")
    logging.getLogger("test.cli.quiet").error("forged\nline")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    first = LINE.match(lines[0])
    assert first is not None
    assert first.group("level", "proc", "logger", "msg") == (
        "INFO",
        "worker-1",
        "test.cli.loud",
        "hello there",
    )
    assert lines[0].split(" ")[1:3] == ["INFO", ""]  # the level is padded to 5 characters
    second = LINE.match(lines[1])
    assert second is not None
    assert second.group("msg") == "forged\\nline"  # one record, one line


def test_configure_logging_is_idempotent(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LoggingConfig(), "a")
    configure_logging(LoggingConfig(), "b")
    logging.getLogger("test.cli.once").warning("once")
    [line] = capsys.readouterr().err.splitlines()
    assert " b test.cli.once: once" in line


def test_traceback_lines_are_indented(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LoggingConfig(), "p")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("test.cli.exc").exception("failed")
    first, *rest = capsys.readouterr().err.splitlines()
    assert first.endswith("ERROR p test.cli.exc: failed")
    assert rest and all(line.startswith("  ") for line in rest)
    assert rest[-1] == "  ValueError: boom"


# --- meshctl --------------------------------------------------------------------------------------


def test_meshctl_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert meshctl.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("meshctl ")


def test_meshctl_without_a_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert meshctl.main([]) == 2
    assert "meshctl: a command is required" in capsys.readouterr().err
