"""tools.meshctl: `keygen` end to end (files, output, errors) and the commands not available yet."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mesh.curve import load_keys
from tools import meshctl


def test_keygen_defaults_write_cluster_pair_in_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert meshctl.main(["keygen"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["cluster.key", "cluster.key_secret"]
    keys = load_keys(str(tmp_path / "cluster.key_secret"))
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"public key file: {os.path.join('.', 'cluster.key')}"
    assert out[1].startswith(f"secret key file: {os.path.join('.', 'cluster.key_secret')}")
    assert out[2] == f"public key: {keys.public.decode()}"
    assert keys.secret.decode() not in "\n".join(out)


def test_keygen_with_dir_and_name_then_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "keys"
    assert meshctl.main(["--json", "keygen", "--dir", str(directory), "node-1"]) == 0
    secret_path = directory / "node-1.key_secret"
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    keys = load_keys(str(secret_path), str(directory))  # per-node mode: the dir holds node-1.key
    assert dict(keys.peers) == {"node-1": keys.public}
    assert keys.public.decode() in capsys.readouterr().out


def test_keygen_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert meshctl.main(["keygen", "--dir", str(tmp_path)]) == 0
    before = (tmp_path / "cluster.key_secret").read_bytes()
    capsys.readouterr()
    assert meshctl.main(["keygen", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("meshctl: ") and "already exists; refusing to overwrite" in err
    assert (tmp_path / "cluster.key_secret").read_bytes() == before


def test_keygen_bad_name_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert meshctl.main(["keygen", "--dir", str(tmp_path), "a/b"]) == 1
    assert capsys.readouterr().err.startswith("meshctl: 'a/b': a key name must be")
    assert os.listdir(tmp_path) == []


def test_keygen_unknown_option_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert meshctl.main(["keygen", "--dir", str(tmp_path), "--force"]) == 2
    assert "unrecognized arguments: --force" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert meshctl.main([]) == 2
    assert "a command is required" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert meshctl.main(["bogus"]) == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert meshctl.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--json" in out
    for command in ("keygen", "members", "health", "drain"):
        assert command in out
