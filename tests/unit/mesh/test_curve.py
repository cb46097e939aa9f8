"""mesh.curve: key files (generate, load, errors) and real CURVE links on 127.0.0.1."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from mesh.curve import (
    CurveError,
    CurveKeys,
    client_socket,
    generate,
    load_keys,
    server_socket,
    start_authenticator,
)
from mesh.errors import MeshError

Contexts = tuple[zmq.Context[zmq.Socket[bytes]], zmq.Context[zmq.Socket[bytes]]]
REFUSED_WAIT_MS = 500  # how long a refused client is watched for a message that must not arrive
ADMITTED_WAIT_MS = 5000  # generous bound for a handshake that must succeed


# --- files ----------------------------------------------------------------------------------------


def test_generate_writes_a_certificate_pair(tmp_path: Path) -> None:
    public_path, secret_path = generate(str(tmp_path), "cluster")
    assert (public_path, secret_path) == (str(tmp_path / "cluster.key"), str(tmp_path / "cluster.key_secret"))
    assert stat.S_IMODE(os.stat(secret_path).st_mode) == 0o600
    assert "secret-key" not in Path(public_path).read_text()
    assert "secret-key" in Path(secret_path).read_text()
    assert sorted(os.listdir(tmp_path)) == ["cluster.key", "cluster.key_secret"]  # no staging left
    public, secret = zmq.auth.load_certificate(secret_path)
    assert secret is not None and zmq.curve_public(secret) == public
    assert zmq.auth.load_certificate(public_path) == (public, None)


def test_generate_creates_the_directory(tmp_path: Path) -> None:
    public_path, _ = generate(str(tmp_path / "keys" / "a"), "node-1")
    assert Path(public_path).is_file()


@pytest.mark.parametrize("existing", ["cluster.key", "cluster.key_secret"])
def test_generate_refuses_to_overwrite(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_text("keep me")
    with pytest.raises(CurveError, match=r"already exists; refusing to overwrite"):
        generate(str(tmp_path), "cluster")
    assert (tmp_path / existing).read_text() == "keep me"
    assert os.listdir(tmp_path) == [existing]


def test_generate_twice_refuses_and_keeps_the_first_pair(tmp_path: Path) -> None:
    _, secret_path = generate(str(tmp_path), "n1")
    before = Path(secret_path).read_text()
    with pytest.raises(CurveError, match=r"n1\.key: already exists"):
        generate(str(tmp_path), "n1")
    assert Path(secret_path).read_text() == before


@pytest.mark.parametrize("name", ["", "../evil", "a/b", "-x", "a b"])
def test_generate_refuses_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(CurveError, match=r"a key name must be"):
        generate(str(tmp_path), name)


def test_curve_error_is_a_mesh_error() -> None:
    assert issubclass(CurveError, MeshError)


def test_cluster_key_mode(tmp_path: Path) -> None:
    public_path, secret_path = generate(str(tmp_path), "cluster")
    keys = load_keys(secret_path)
    public, _ = zmq.auth.load_certificate(public_path)
    assert (keys.public, keys.allowed, dict(keys.peers), keys.shared) == (
        public,
        frozenset({public}),
        {},
        True,
    )
    assert len(keys.public) == len(keys.secret) == 40
    assert keys.secret.decode() not in repr(keys)


def test_per_node_mode(tmp_path: Path) -> None:
    own, allowed = tmp_path / "own", tmp_path / "allowed"
    allowed.mkdir()
    for name in ("n1", "n2", "n3"):
        generate(str(own), name)
        os.link(own / f"{name}.key", allowed / f"{name}.key")
    keys = load_keys(str(own / "n2.key_secret"), str(allowed))
    assert keys.shared is False
    assert sorted(keys.peers) == ["n1", "n2", "n3"]
    assert keys.peers["n2"] == keys.public
    assert keys.allowed == frozenset(keys.peers.values())


def test_load_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.key_secret"
    with pytest.raises(CurveError, match=rf"^{missing}: no such key file"):
        load_keys(str(missing))


def test_load_public_only_file(tmp_path: Path) -> None:
    public_path, _ = generate(str(tmp_path), "cluster")
    with pytest.raises(CurveError, match=rf"^{public_path}: holds only a public key"):
        load_keys(public_path)


def test_load_a_file_that_is_not_a_certificate(tmp_path: Path) -> None:
    path = tmp_path / "junk.key_secret"
    path.write_text("hello\n")
    with pytest.raises(CurveError, match=r"not a ZeroMQ certificate"):
        load_keys(str(path))


def test_load_a_mangled_key(tmp_path: Path) -> None:
    _, secret_path = generate(str(tmp_path), "cluster")
    text = Path(secret_path).read_text()
    Path(secret_path).write_text(text.replace('secret-key = "', 'secret-key = "xx'))
    with pytest.raises(CurveError, match=r"the secret key is not a 40-character z85 CURVE key"):
        load_keys(secret_path)


def test_load_a_secret_of_another_pair(tmp_path: Path) -> None:
    _, a = generate(str(tmp_path), "a")
    _, b = generate(str(tmp_path), "b")
    b_lines = Path(b).read_text().splitlines()
    b_secret = next(line for line in b_lines if "secret-key" in line)
    mixed = [b_secret if "secret-key" in line else line for line in Path(a).read_text().splitlines()]
    Path(a).write_text("\n".join(mixed) + "\n")
    with pytest.raises(CurveError, match=r"does not belong to the public key"):
        load_keys(a)


def test_load_own_key_not_in_dir(tmp_path: Path) -> None:
    _, secret_path = generate(str(tmp_path / "own"), "n1")
    generate(str(tmp_path / "allowed"), "n2")
    with pytest.raises(CurveError, match=r"this node's public key .* is not among the allowed keys"):
        load_keys(secret_path, str(tmp_path / "allowed"))


def test_load_missing_dir(tmp_path: Path) -> None:
    _, secret_path = generate(str(tmp_path), "n1")
    with pytest.raises(CurveError, match=r"nodir: not a directory"):
        load_keys(secret_path, str(tmp_path / "nodir"))


def test_load_bad_file_name_in_dir(tmp_path: Path) -> None:
    _, secret_path = generate(str(tmp_path), "n1")
    os.link(tmp_path / "n1.key", tmp_path / "bad name.key")
    with pytest.raises(CurveError, match=r"bad name\.key: the file name must be <NodeName>\.key"):
        load_keys(secret_path, str(tmp_path))


# --- links ----------------------------------------------------------------------------------------


@pytest.fixture
def contexts() -> Iterator[Contexts]:
    """A server context and a client context (ZAP handlers are per context, as per process)."""
    server_ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    client_ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield server_ctx, client_ctx
    client_ctx.destroy(linger=0)
    server_ctx.destroy(linger=0)


def exchange(
    contexts: Contexts,
    server_keys: CurveKeys,
    client_keys: CurveKeys,
    server_public: bytes,
    wait_ms: int,
) -> list[bytes] | None:
    """Send one message client -> server over a CURVE link; the frames the ROUTER got, or None."""
    server_ctx, client_ctx = contexts
    authenticator = start_authenticator(server_ctx, server_keys)
    try:
        router = server_ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        server_socket(router, server_keys)
        router.bind("tcp://127.0.0.1:*")
        address = router.getsockopt_string(zmq.LAST_ENDPOINT)
        dealer = client_ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        client_socket(dealer, client_keys, server_public)
        dealer.connect(address)
        dealer.send_multipart([b"hello", b"mesh"], flags=zmq.NOBLOCK)
        try:
            if router.poll(wait_ms, zmq.POLLIN):
                return router.recv_multipart(flags=zmq.NOBLOCK)
            return None
        finally:
            dealer.close(linger=0)
            router.close(linger=0)
    finally:
        authenticator.stop()


def test_cluster_key_link_passes_a_message(tmp_path: Path, contexts: Contexts) -> None:
    _, secret_path = generate(str(tmp_path), "cluster")
    keys = load_keys(secret_path)
    frames = exchange(contexts, keys, keys, keys.public, ADMITTED_WAIT_MS)
    assert frames is not None and frames[1:] == [b"hello", b"mesh"]


def test_a_client_with_another_pair_gets_nothing_through(tmp_path: Path, contexts: Contexts) -> None:
    _, cluster = generate(str(tmp_path / "a"), "cluster")
    _, stranger = generate(str(tmp_path / "b"), "cluster")
    server_keys, stranger_keys = load_keys(cluster), load_keys(stranger)
    frames = exchange(contexts, server_keys, stranger_keys, server_keys.public, REFUSED_WAIT_MS)
    assert frames is None


def test_a_client_with_the_wrong_server_key_gets_nothing_through(tmp_path: Path, contexts: Contexts) -> None:
    _, cluster = generate(str(tmp_path / "a"), "cluster")
    _, other = generate(str(tmp_path / "b"), "other")
    keys, other_keys = load_keys(cluster), load_keys(other)
    frames = exchange(contexts, keys, keys, other_keys.public, REFUSED_WAIT_MS)
    assert frames is None


def per_node_keys(tmp_path: Path) -> dict[str, CurveKeys]:
    """n1 and n2 listed in the allow-list directory; n3 has a pair but is not listed."""
    own, allowed = tmp_path / "own", tmp_path / "allowed"
    allowed.mkdir()
    for name in ("n1", "n2", "n3"):
        generate(str(own), name)
    for name in ("n1", "n2"):
        os.link(own / f"{name}.key", allowed / f"{name}.key")
    keys = {name: load_keys(str(own / f"{name}.key_secret"), str(allowed)) for name in ("n1", "n2")}
    keys["n3"] = load_keys(str(own / "n3.key_secret"))  # n3 on its own: it is not in n1's list
    return keys


def test_per_node_allow_list_admits_a_listed_node(tmp_path: Path, contexts: Contexts) -> None:
    keys = per_node_keys(tmp_path)
    server, client = keys["n1"], keys["n2"]
    frames = exchange(contexts, server, client, client.peers["n1"], ADMITTED_WAIT_MS)
    assert frames is not None and frames[1:] == [b"hello", b"mesh"]


def test_per_node_allow_list_refuses_an_unlisted_node(tmp_path: Path, contexts: Contexts) -> None:
    keys = per_node_keys(tmp_path)
    server, stranger = keys["n1"], keys["n3"]
    assert stranger.public not in server.allowed
    frames = exchange(contexts, server, stranger, server.public, REFUSED_WAIT_MS)
    assert frames is None


def test_without_an_authenticator_nobody_is_admitted(tmp_path: Path, contexts: Contexts) -> None:
    """server_socket fails closed (ZAP_ENFORCE_DOMAIN): forgetting start_authenticator locks everyone out."""
    _, secret_path = generate(str(tmp_path), "cluster")
    keys = load_keys(secret_path)
    server_ctx, client_ctx = contexts
    router = server_ctx.socket(zmq.ROUTER)
    server_socket(router, keys)
    router.bind("tcp://127.0.0.1:*")
    dealer = client_ctx.socket(zmq.DEALER)
    client_socket(dealer, keys, keys.public)
    dealer.connect(router.getsockopt_string(zmq.LAST_ENDPOINT))
    dealer.send(b"hello", flags=zmq.NOBLOCK)
    assert router.poll(REFUSED_WAIT_MS, zmq.POLLIN) == 0
    dealer.close(linger=0)
    router.close(linger=0)
