"""A session store the node cannot use stops it at start with a clear error (issue 4).

A wrong database name or a wrong password cannot get better by retrying, so the store process
exits with its "configuration" status and the supervisor stops the node with a non-zero exit
status, after one log line that says what is wrong. (An unreachable server is different: the
store waits for it and says so; that is the outage tests' subject.)
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.e2e.broker_proc import free_port
from tests.pg import PASSWORD_ROLE, PgServer

pytestmark = [pytest.mark.meshmq_only, pytest.mark.postgres]


def run_node(tmp_path: Path, postgres: dict[str, object]) -> subprocess.CompletedProcess[str]:
    config = {
        "ListenAddress": "127.0.0.1",
        "TCP": free_port(),
        "Workers": 1,
        "SessionStore": {"Type": "POSTGRES", "Postgres": postgres},
    }
    path = tmp_path / "meshmq.yaml"
    path.write_text(yaml.safe_dump(config))
    exe = Path(__import__("sys").executable).with_name("meshmq")
    return subprocess.run([str(exe), "-config", str(path)], capture_output=True, text=True, timeout=60)


def test_a_missing_database_stops_the_node(pg_server: PgServer, tmp_path: Path) -> None:
    done = run_node(tmp_path, {"Url": pg_server.url("no_such_database")})
    assert done.returncode == 3, done.stderr[-2000:]
    assert "no_such_database" in done.stderr
    assert "stopping the node" in done.stderr


def test_a_wrong_password_stops_the_node(pg_server: PgServer, tmp_path: Path) -> None:
    url = f"postgresql://{pg_server.host}:{pg_server.port}/postgres"
    done = run_node(tmp_path, {"Url": url, "User": PASSWORD_ROLE, "Pass": "not-the-password"})
    assert done.returncode == 3, done.stderr[-2000:]
    assert "password" in done.stderr.lower()
    assert "not-the-password" not in done.stderr  # secrets stay out of the log
