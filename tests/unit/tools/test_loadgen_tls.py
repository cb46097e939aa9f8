"""The load generator over TLS, and the bench's `tls` group.

The client path runs for real against Debian's mosquitto with a TLS listener (started and stopped
by PID through `tools.bench_brokers`, certificates from `tools.certs`): the generator's clients
connect with TLS 1.3, verify the broker, and count what arrives; a CA that did not sign the
broker's certificate, or a TLS client on a plain port, fails. The group's figures (TLS cost,
ratios), its table, its JSON and its bench options are checked on made-up results. No timings
are asserted.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from broker.config import parse_config
from tools import bench, certs
from tools.bench_brokers import HOST, MOSQUITTO, BrokerSpec, free_port
from tools.loadgen import __main__ as loadgen_cli
from tools.loadgen import clients, tls, worker
from tools.loadgen.scenarios import SCENARIOS, Metric, Params, ScenarioResult, run_scenario, stages_for
from tools.loadgen.worker import RoleKind, WorkerSpec

needs_mosquitto = pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason=f"{MOSQUITTO} not installed")
QUICK = Params(seconds=0.5, warmup_s=0.2, drain_s=3.0, quiet_s=0.5, idle_connections=20)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> certs.Pki:
    return certs.make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory, pki: certs.Pki) -> Iterator[tls.TlsBroker]:
    spec = BrokerSpec("Mosquitto", "mosquitto")
    broker = tls.TlsBroker(spec, tmp_path_factory.mktemp("mosquitto-tls"), pki=pki)
    assert broker.start(), broker.start_error
    yield broker
    broker.stop()
    assert not broker.alive()


def _tls(pki: certs.Pki) -> Params:
    return Params(
        seconds=QUICK.seconds,
        warmup_s=QUICK.warmup_s,
        drain_s=QUICK.drain_s,
        quiet_s=QUICK.quiet_s,
        idle_connections=QUICK.idle_connections,
        tls_ca_file=str(pki.ca_cert),
    )


def _value(result: ScenarioResult, name: str) -> float:
    value = result.value(name)
    assert value is not None, f"{result.scenario}: no {name!r} in {result.metrics}"
    return value


# --- the client path against mosquitto's TLS listener --------------------------------------------


@needs_mosquitto
def test_the_broker_negotiates_tls_1_3_with_the_generators_context(mosquitto: tls.TlsBroker) -> None:
    assert mosquitto.negotiated.startswith("TLSv1.3 "), mosquitto.negotiated
    assert mosquitto.pki is not None
    with pytest.raises((ssl.SSLError, OSError)):
        tls.probe_tls(mosquitto.port, mosquitto.pki.ca_cert)  # the plain listener speaks no TLS


@needs_mosquitto
def test_a_client_connection_is_tls_and_keeps_its_socket_tuning(
    mosquitto: tls.TlsBroker, pki: certs.Pki
) -> None:
    spec = WorkerSpec(
        "t/sub/0", RoleKind.SUBSCRIBE_COUNT, HOST, mosquitto.tls_port, ("t/#",), tls_ca_file=str(pki.ca_cert)
    )

    async def main() -> tuple[str | None, int]:
        context = worker.client_ssl_context(str(pki.ca_cert))
        client = await worker._connect(spec, 0, "t/#", asyncio.Semaphore(1), tls=context)
        try:
            assert isinstance(client, clients.CountingSubscriber)
            assert client.transport is not None
            ssl_object = client.transport.get_extra_info("ssl_object")
            client._set_lowat(4096)  # SO_RCVLOWAT reaches the TCP socket under the TLS transport
            sock = client.transport.get_extra_info("socket")
            return ssl_object.version(), sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)
        finally:
            client.close()
            await asyncio.sleep(0.05)

    version, lowat = asyncio.run(main())
    assert version == "TLSv1.3"
    assert lowat == 4096


@needs_mosquitto
@pytest.mark.slow
def test_fan_in_over_tls(mosquitto: tls.TlsBroker, pki: certs.Pki) -> None:
    result = run_scenario("fan-in", HOST, mosquitto.tls_port, _tls(pki), mosquitto.pid)
    assert result.ok, (result.errors, result.metrics)
    assert _value(result, "received msg/s") > 0
    assert _value(result, "extra deliveries") == 0
    assert _value(result, "broker CPU µs/msg") > 0


@needs_mosquitto
@pytest.mark.slow
def test_latency_over_tls(mosquitto: tls.TlsBroker, pki: certs.Pki) -> None:
    result = run_scenario("latency", HOST, mosquitto.tls_port, _tls(pki), mosquitto.pid)
    assert result.ok, (result.errors, result.metrics)
    assert _value(result, "samples") > 0
    assert _value(result, "loss") == 0
    assert 0 < _value(result, "p50") <= _value(result, "p99") <= _value(result, "max")


@needs_mosquitto
@pytest.mark.slow
def test_idle_connections_over_tls(mosquitto: tls.TlsBroker, pki: certs.Pki) -> None:
    result = run_scenario("idle-connections", HOST, mosquitto.tls_port, _tls(pki), mosquitto.pid)
    assert result.ok, (result.errors, result.metrics)
    assert _value(result, "connected") == QUICK.idle_connections
    assert _value(result, "failed") == 0


@needs_mosquitto
def test_a_ca_that_did_not_sign_the_broker_fails_the_run(mosquitto: tls.TlsBroker, tmp_path: Path) -> None:
    stranger = certs.make_ca(tmp_path, "stranger")
    params = Params(seconds=QUICK.seconds, warmup_s=QUICK.warmup_s, tls_ca_file=str(stranger.cert))
    result = run_scenario("latency", HOST, mosquitto.tls_port, params, mosquitto.pid)
    assert not result.ok and not result.metrics
    assert any("CERTIFICATE_VERIFY_FAILED" in e for e in result.errors), result.errors


@needs_mosquitto
def test_tls_clients_on_a_plain_port_fail_the_run(mosquitto: tls.TlsBroker, pki: certs.Pki) -> None:
    result = run_scenario("latency", HOST, mosquitto.port, _tls(pki), mosquitto.pid)
    assert not result.ok and not result.metrics and result.errors


# --- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_worker_of_a_scenario_gets_the_ca(scenario: str) -> None:
    specs = [s for stage in stages_for(scenario, HOST, 1883, Params(idle_connections=4)) for s in stage]
    assert specs and all(s.tls_ca_file is None for s in specs)  # plain by default
    ca = Params(idle_connections=4, tls_ca_file="/pki/ca.crt")
    assert all(
        s.tls_ca_file == "/pki/ca.crt" for stage in stages_for(scenario, HOST, 1883, ca) for s in stage
    )


def test_loadgen_cli_takes_a_ca() -> None:
    assert loadgen_cli.build_parser().parse_args(["--port", "8883", "--tls-ca", "ca.crt"]).tls_ca == "ca.crt"
    assert loadgen_cli.build_parser().parse_args(["--port", "1883"]).tls_ca is None


def test_tls_is_a_bench_group_run_by_default_with_its_own_window() -> None:
    parser = bench.build_parser()
    defaults = parser.parse_args([])
    assert tls.SCENARIO in defaults.scenarios
    assert defaults.tls_seconds == tls.DEFAULT_SECONDS
    chosen = parser.parse_args(["--scenarios", "tls", "--tls-seconds", "1.5"])
    assert (chosen.scenarios, chosen.tls_seconds) == (["tls"], 1.5)


# --- broker configurations -----------------------------------------------------------------------


def test_meshmq_gets_a_tcps_listener_with_the_pki(tmp_path: Path, pki: certs.Pki) -> None:
    broker = tls.TlsBroker(BrokerSpec("MeshMQ", "meshmq", tls.MESHMQ_ARGS), tmp_path, pki=pki)
    broker.port = free_port()
    command = broker._command()
    assert command[-2:] == tls.MESHMQ_ARGS
    config = parse_config(yaml.safe_load((tmp_path / "meshmq.yaml").read_text()))
    assert config.tcp_port == broker.port
    assert config.tls_port == broker.tls_port != broker.port
    assert (config.tls.cert_file, config.tls.key_file) == (str(pki.server_cert), str(pki.server_key))


def test_mosquitto_gets_a_second_listener_with_the_pki(tmp_path: Path, pki: certs.Pki) -> None:
    broker = tls.TlsBroker(BrokerSpec("Mosquitto", "mosquitto"), tmp_path, pki=pki)
    broker.port = free_port()
    broker._command()
    lines = (tmp_path / "mosquitto.conf").read_text().splitlines()
    plain, secure = (
        lines.index(f"listener {broker.port} {HOST}"),
        lines.index(f"listener {broker.tls_port} {HOST}"),
    )
    assert plain < secure
    assert lines[secure + 1 :] == [
        f"cafile {pki.ca_cert}",
        f"certfile {pki.server_cert}",
        f"keyfile {pki.server_key}",
    ]
    assert "user root" in lines[:secure]  # global: Mosquitto must not drop to a user who cannot read the PKI


# --- figures, table, JSON ------------------------------------------------------------------------


def _result(
    scenario: str, broker_us: float, broker_pct: float = 80.0, rate: float = 1000.0
) -> ScenarioResult:
    head = (
        [Metric("received msg/s", rate, "msg/s"), Metric("loss", 0.0, "%", "lower")]
        if scenario == "fan-in"
        else [Metric("p50", 0.1, "ms", "lower"), Metric("p99", 0.5, "ms", "lower")]
    )
    metrics = (
        *head,
        Metric("broker CPU µs/msg", broker_us, "µs", "lower"),
        Metric("broker CPU", broker_pct, "%", ""),
        Metric("generator CPU", 40.0, "%", ""),
        Metric("generator busiest proc CPU", 30.0, "%", ""),
    )
    return tls.with_generator_cpu(ScenarioResult(scenario, metrics, ()))


def _group() -> tls.TlsResult:
    us = {
        ("MeshMQ", "plain"): 3.0,
        ("MeshMQ", "tls"): 5.0,
        ("Mosquitto", "plain"): 5.0,
        ("Mosquitto", "tls"): 6.0,
    }
    runs = tuple(
        tls.TlsRun(
            name,
            scenario,
            transport,
            _result(scenario, us[name, transport] * (10 if scenario == "latency" else 1)),
        )
        for scenario in tls.BASES
        for transport in tls.TRANSPORTS
        for name in ("MeshMQ", "Mosquitto")
    )
    negotiated = (
        ("MeshMQ", "TLSv1.3 TLS_AES_256_GCM_SHA384"),
        ("Mosquitto", "TLSv1.3 TLS_AES_256_GCM_SHA384"),
    )
    return tls.TlsResult(("MeshMQ", "Mosquitto"), runs, (), negotiated)


def test_generator_cpu_per_message_comes_from_the_same_window() -> None:
    assert _result("fan-in", 4.0, broker_pct=80.0).value(tls.GENERATOR_CPU) == pytest.approx(
        2.0
    )  # 4 × 40 / 80


def test_tls_cost_is_tls_minus_plain_and_the_ratio_is_meshmq_over_mosquitto() -> None:
    group = _group()
    assert group.cost("MeshMQ", "fan-in") == pytest.approx(2.0)
    assert group.cost("Mosquitto", "fan-in") == pytest.approx(1.0)
    assert group.cost("MeshMQ", "latency") == pytest.approx(20.0)
    assert not group.failed
    text = tls.render(group)
    cells = next(line.split() for line in text.splitlines() if "broker CPU µs/msg" in line)
    # MeshMQ plain, TLS, +TLS; Mosquitto plain, TLS, +TLS; ratios plain, TLS, +TLS
    assert cells[-9:] == ["3", "5", "+2", "5", "6", "+1", "0.60", "0.83", "2.00"]
    assert "TLS cost per message, fan-in (broker CPU, TLS - plain): MeshMQ +2 µs, Mosquitto +1 µs" in text
    assert "(MeshMQ/Mosquitto 2.00)" in text
    assert "MeshMQ negotiated TLSv1.3" in text
    assert "problem" not in text
    report = json.loads(json.dumps(tls.as_json(group)))
    assert report["tls_cost_us_per_msg"]["fan-in"] == {"MeshMQ": 2.0, "Mosquitto": 1.0}
    assert len(report["runs"]) == 8


def test_a_failed_run_or_broker_fails_the_group_and_is_shown() -> None:
    group = _group()
    broken = tls.TlsRun("MeshMQ", "latency", "tls", ScenarioResult("latency", (), ("connect: refused",)))
    runs = tuple(r for r in group.runs if (r.broker, r.scenario, r.transport) != ("MeshMQ", "latency", "tls"))
    failed = tls.TlsResult(group.labels, (*runs, broken), ("Mosquitto: exited with code 3",))
    assert failed.failed
    assert failed.cost("MeshMQ", "latency") is None
    text = tls.render(failed)
    assert "problem: MeshMQ latency over tls: connect: refused" in text
    assert "problem: Mosquitto: exited with code 3" in text


def test_one_broker_only_has_no_ratio_columns() -> None:
    group = _group()
    alone = tls.TlsResult(("Mosquitto",), tuple(r for r in group.runs if r.broker == "Mosquitto"))
    header = tls.render(alone).splitlines()[0]
    assert "ratio" not in header and "MeshMQ" not in header


# --- the whole group -----------------------------------------------------------------------------


@needs_mosquitto
@pytest.mark.slow
def test_the_group_runs_against_mosquitto(tmp_path: Path) -> None:
    group = tls.run_tls(
        tls.TlsParams(seconds=0.5, warmup_s=0.2), ("mosquitto",), progress=False, workdir=tmp_path
    )
    assert not group.errors
    assert [(r.scenario, r.transport) for r in group.runs] == [
        ("fan-in", "plain"),
        ("fan-in", "tls"),
        ("latency", "plain"),
        ("latency", "tls"),
    ]
    assert all(r.result.ok for r in group.runs), [r.result.errors for r in group.runs]
    assert group.cost("Mosquitto", "fan-in") is not None
    assert os.listdir(tmp_path) == []  # the PKI and the broker's files are gone with the run


@pytest.mark.slow
def test_the_group_runs_against_meshmq() -> None:
    # The default temporary directory: under pytest's tmp_path, MeshMQ's ipc:// socket paths would
    # pass the 107 bytes of a Unix socket address.
    group = tls.run_tls(tls.TlsParams(seconds=0.5, warmup_s=0.2), ("meshmq",), progress=False)
    assert not group.errors, group.errors
    assert dict(group.negotiated)["MeshMQ"].startswith("TLSv1.3 ")
    assert all(r.result.ok for r in group.runs), [r.result.errors for r in group.runs]
