"""MQTT over WebSocket (WS and WSS listeners) end to end: paho's websockets transport in 3.1.1
and 5.0, traffic across transports, the HTTP upgrade's refusals, text frames, packets across
frames, and the kernel spreading WebSocket connections over two workers (broker/ACCESS.md).

Brokers are module-scoped; every connection goes to 127.0.0.1.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import ssl
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.broker_proc import BrokerProcess, free_port
from tests.e2e.clients import TestClient
from tools.certs import Pki, make_pki

pytestmark = pytest.mark.meshmq_only

PATH = "/mqtt-ws"  # not the default, so that WebSocket.Path is seen to apply


@dataclass
class Endpoint:
    host: str
    port: int


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[BrokerProcess]:
    config = {
        "WS": free_port(),
        "WSS": free_port(),
        "WebSocket": {"Path": PATH},
        "TLS": {"CertFile": str(pki.server_cert), "KeyFile": str(pki.server_key)},
        "MQTT": {"MaxPacketSize": 65536},
    }
    b = BrokerProcess(workdir=tmp_path_factory.mktemp("ws"), config=config).start()
    yield b
    b.stop()


def ws_client(
    made: list[TestClient],
    broker: BrokerProcess,
    client_id: str,
    *,
    secure: bool = False,
    version: int = 5,
    pki: Pki | None = None,
    connect: bool = True,
) -> TestClient:
    port = int(broker.config["WSS" if secure else "WS"])
    c = TestClient(Endpoint(broker.host, port), client_id, version=version)
    c._client.transport = "websockets"
    c._client.ws_set_options(path=PATH)
    if secure:
        assert pki is not None
        c._client.tls_set_context(ssl.create_default_context(cafile=str(pki.ca_cert)))
    made.append(c)
    if connect:
        assert c.connect().reason_code == 0
    return c


def tcp_client(made: list[TestClient], broker: BrokerProcess, client_id: str) -> TestClient:
    c = TestClient(broker, client_id)
    made.append(c)
    assert c.connect().reason_code == 0
    return c


def round_trip(sub: TestClient, pub: TestClient, topic: str, payload: bytes = b"hi") -> None:
    sub.subscribe(topic, qos=1)
    pub.publish(topic, payload, qos=1)
    m = sub.expect_one()
    assert (m.topic, m.payload) == (topic, payload)


# --- a raw WebSocket client (bytes a well-behaved client never sends) ------------------------------


def upgrade_request(path: str, subprotocol: str | None = "mqtt") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_http_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client frame."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """(opcode, payload) of the next server frame (servers do not mask)."""

    def exact(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    b0, b1 = exact(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", exact(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", exact(8))[0]
    return b0 & 0x0F, exact(n)


def raw_ws(broker: BrokerProcess) -> socket.socket:
    sock = socket.create_connection((broker.host, int(broker.config["WS"])), timeout=5)
    sock.sendall(upgrade_request(PATH))
    response = read_http_response(sock)
    assert response.startswith(b"HTTP/1.1 101"), response
    assert b"sec-websocket-protocol: mqtt" in response.lower()
    return sock


CONNECT_311 = bytes([0x10, 0x0E]) + b"\x00\x04MQTT\x04\x02\x00\x3c" + b"\x00\x02rw"
PINGREQ = b"\xc0\x00"
BINARY, TEXT, CLOSE = 0x2, 0x1, 0x8


# --- paho over WS and WSS --------------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("secure", [False, True], ids=["ws", "wss"])
def test_paho_over_websocket(
    broker: BrokerProcess, pki: Pki, clients: list[TestClient], secure: bool, version: int
) -> None:
    name = f"{'wss' if secure else 'ws'}-{version}"
    sub = ws_client(clients, broker, f"{name}-sub", secure=secure, version=version, pki=pki)
    pub = ws_client(clients, broker, f"{name}-pub", secure=secure, version=version, pki=pki)
    round_trip(sub, pub, f"ws/{name}", b"x" * 20000)  # larger than one TCP segment


def test_across_transports(broker: BrokerProcess, pki: Pki, clients: list[TestClient]) -> None:
    ws = ws_client(clients, broker, "x-ws")
    wss = ws_client(clients, broker, "x-wss", secure=True, pki=pki)
    tcp = tcp_client(clients, broker, "x-tcp")
    round_trip(ws, tcp, "x/tcp-to-ws")
    round_trip(tcp, ws, "x/ws-to-tcp")
    round_trip(wss, ws, "x/ws-to-wss")


# --- the upgrade -----------------------------------------------------------------------------------


def test_wrong_path_is_404(broker: BrokerProcess) -> None:
    with socket.create_connection((broker.host, int(broker.config["WS"])), timeout=5) as sock:
        sock.sendall(upgrade_request("/elsewhere"))
        response = read_http_response(sock)
    assert response.startswith(b"HTTP/1.1 404"), response


def test_no_subprotocol_is_400(broker: BrokerProcess) -> None:
    for subprotocol in (None, "not-mqtt"):
        with socket.create_connection((broker.host, int(broker.config["WS"])), timeout=5) as sock:
            sock.sendall(upgrade_request(PATH, subprotocol))
            response = read_http_response(sock)
        assert response.startswith(b"HTTP/1.1 400"), response


def test_old_subprotocol_name_is_accepted(broker: BrokerProcess) -> None:
    with socket.create_connection((broker.host, int(broker.config["WS"])), timeout=5) as sock:
        sock.sendall(upgrade_request(PATH, "mqttv3.1"))
        response = read_http_response(sock)
    assert response.startswith(b"HTTP/1.1 101"), response
    assert b"sec-websocket-protocol: mqttv3.1" in response.lower()


# --- frames ----------------------------------------------------------------------------------------


def test_packets_span_frames_and_frames_hold_packets(broker: BrokerProcess) -> None:
    with raw_ws(broker) as sock:
        sock.sendall(frame(BINARY, CONNECT_311[:5]) + frame(BINARY, CONNECT_311[5:]))
        assert read_frame(sock) == (BINARY, b"\x20\x02\x00\x00")  # CONNACK accepted
        sock.sendall(frame(BINARY, PINGREQ + PINGREQ))
        got = b""
        while len(got) < 4:
            opcode, payload = read_frame(sock)
            assert opcode == BINARY
            got += payload
        assert got == b"\xd0\x00\xd0\x00"  # two PINGRESP
        sock.sendall(frame(0x9, b"ping?"))  # a WebSocket ping is answered by a pong
        assert read_frame(sock) == (0xA, b"ping?")


def test_text_frame_closes_only_that_connection(broker: BrokerProcess, clients: list[TestClient]) -> None:
    bystander = ws_client(clients, broker, "bystander")
    bystander.subscribe("text/t", qos=1)
    with raw_ws(broker) as sock:
        sock.sendall(frame(BINARY, CONNECT_311))
        assert read_frame(sock)[0] == BINARY
        sock.sendall(frame(TEXT, b"hello"))
        opcode, payload = read_frame(sock)
        assert opcode == CLOSE
        assert struct.unpack("!H", payload[:2])[0] == 1003
        sock.settimeout(5)
        assert sock.recv(100) == b""  # the server closes the TCP connection
    publisher = tcp_client(clients, broker, "text-pub")
    publisher.publish("text/t", b"still here", qos=1)
    assert bystander.expect_one().payload == b"still here"


def test_oversized_frame_is_refused(broker: BrokerProcess) -> None:
    with raw_ws(broker) as sock:
        sock.sendall(frame(BINARY, CONNECT_311))
        assert read_frame(sock)[0] == BINARY
        sock.sendall(frame(BINARY, b"\x30" + b"\x00" * 70000))  # > MQTT.MaxPacketSize (65536)
        opcode, payload = read_frame(sock)
        assert opcode == CLOSE
        assert struct.unpack("!H", payload[:2])[0] == 1009  # message too big


# --- two workers -----------------------------------------------------------------------------------


def test_websocket_connections_spread_over_workers(tmp_path: Path, clients: list[TestClient]) -> None:
    config = {"WS": free_port(), "WebSocket": {"Path": PATH}, "Workers": 2}
    broker = BrokerProcess(workdir=tmp_path, config=config).start()
    try:
        broker.wait_log(r"worker \d: MQTT on ", 2)  # both workers listen (TCP is bound last)
        count = 16
        for i in range(count):
            ws_client(clients, broker, f"spread-{i}", version=4)
        lines = broker.wait_log(
            r"(worker-\d) broker\.handlers\.connect: client 'spread-\d+' connected", count
        )
        assert set(lines) == {"worker-1", "worker-2"}, lines
        round_trip(clients[0], clients[-1], "spread/t")  # and they talk across workers
        assert not re.search(r"Traceback", broker.log())
    finally:
        for c in clients:
            c.close()
        broker.stop()
