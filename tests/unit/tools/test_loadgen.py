"""The load generator: its raw encoders and scanners, its protocols over an in-memory transport,
/proc sampling, the bench's tables, and each scenario for about a second against Debian's
mosquitto (the reference broker: if a scenario's figures are wrong there, the generator is wrong);
then the cross-worker scenarios against a real two-worker MeshMQ node.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tools import bench, bench_brokers, procstat
from tools.loadgen import __main__ as loadgen_cli
from tools.loadgen import clients, wire
from tools.loadgen.scenarios import SCENARIOS, Metric, Params, ScenarioResult, run_scenario, stages_for
from tools.loadgen.worker import RoleKind

HAVE_MOSQUITTO = Path(bench.MOSQUITTO).exists()


# --- wire -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [(0, "00"), (127, "7f"), (128, "8001"), (16_383, "ff7f"), (16_384, "808001"), (268_435_455, "ffffff7f")],
)
def test_varint_known_values(value: int, encoded: str) -> None:
    assert wire.varint(value).hex() == encoded


def test_connect_packet_bytes() -> None:
    v311 = wire.connect_packet("c1", 600)
    assert v311 == bytes.fromhex("100e" + "00044d515454" + "04" + "02" + "0258" + "00026331")
    v5 = wire.connect_packet("c1", 600, wire.MQTT_5)
    assert v5 == bytes.fromhex("100f" + "00044d515454" + "05" + "02" + "0258" + "00" + "00026331")


def test_subscribe_packet_has_reserved_flags_0010() -> None:
    # [MQTT-3.8.1-1] SUBSCRIBE's fixed header flags are 0,0,1,0.
    packet = wire.subscribe_packet(7, ("a/+",), 1)
    assert packet == bytes.fromhex("8208" + "0007" + "0003612f2b" + "01")
    assert wire.subscribe_packet(7, ("a/+",), 1, wire.MQTT_5)[0] == 0x82


@pytest.mark.parametrize("version", [wire.MQTT_311, wire.MQTT_5])
@pytest.mark.parametrize("qos", [0, 1])
def test_publish_template_encodes_like_publish_packet(version: int, qos: int) -> None:
    template = wire.publish_template("bench/q1/7", 64, qos, version)
    expected = wire.publish_packet("bench/q1/7", wire.make_payload(64, 123, 45), qos, 9, version)
    assert template.encode(9, 123, 45) == expected
    assert template.packet_bytes == len(expected)


def test_count_uniform_agrees_with_the_walk() -> None:
    batch = wire.publish_batch("bench/in/3", 64, 10)
    size = len(batch) // 10
    stream = batch + batch[: size // 2]  # ten whole packets and half of one
    assert wire.count_uniform(stream, size) == 10
    others: list[wire.Control] = []
    assert wire.count_publishes(stream, 0, others) == (10, 10 * size)
    assert others == []
    # A different packet among them: the fast path declines instead of guessing.
    mixed = batch[: 3 * size] + wire.PINGREQ_PACKET + batch[3 * size :]
    assert wire.count_uniform(mixed, size) == 0
    count, used = wire.count_publishes(mixed, 0, others)
    assert (count, used) == (10, len(mixed))
    assert [c.packet_type for c in others] == [12]


def test_count_publishes_long_remaining_length() -> None:
    packet = wire.publish_packet("t", wire.make_payload(300))  # Remaining Length takes 2 bytes
    others: list[wire.Control] = []
    assert wire.count_publishes(packet * 3 + packet[:2], 0, others) == (3, 3 * len(packet))
    assert wire.count_publishes(packet[:1], 0, others) == (0, 0)


@pytest.mark.parametrize("version", [wire.MQTT_311, wire.MQTT_5])
def test_scan_publishes_reads_packet_id_stamp_and_seq(version: int) -> None:
    stream = (
        wire.publish_packet("a", wire.make_payload(64, 111, 0), 1, 5, version)
        + wire.publish_packet("bb", wire.make_payload(20, 222, 1), 0, 0, version)
        + bytes.fromhex("d000")  # PINGRESP
    )
    heads: list[tuple[int, int, int]] = []
    others: list[wire.Control] = []
    used = wire.scan_publishes(stream + b"\x30", 0, version, heads, others)
    assert used == len(stream)
    assert heads == [(5, 111, 0), (0, 222, 1)]
    assert [c.packet_type for c in others] == [wire.PINGRESP]


def test_malformed_remaining_length_is_a_wire_error() -> None:
    with pytest.raises(wire.WireError):
        wire.count_publishes(b"\x30\xff\xff\xff\xff\x01", 0, [])


# --- protocols over an in-memory transport ----------------------------------------------------


class FakeTransport:
    """Just enough of asyncio.Transport for the generator's protocols."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def _feed_in_pieces(client: clients.Client, stream: bytes, piece_bytes: int) -> None:
    for at in range(0, len(stream), piece_bytes):
        client.data_received(stream[at : at + piece_bytes])


def _split_stream(stream: bytes) -> list[tuple[int, int]]:
    """(first byte, packet bytes) of each packet: a reference walk for the tests."""
    out = []
    at = 0
    while at < len(stream):
        length, used = 0, 0
        while True:
            byte = stream[at + 1 + used]
            length |= (byte & 0x7F) << (7 * used)
            used += 1
            if byte < 0x80:
                break
        out.append((stream[at], 1 + used + length))
        at += 1 + used + length
    return out


@pytest.mark.parametrize("piece_bytes", [1, 7, 77, 1000, 100_000])
def test_counting_subscriber_counts_across_any_chunking(piece_bytes: int) -> None:
    async def scenario() -> clients.CountingSubscriber:
        sub = clients.CountingSubscriber(wire.MQTT_311)
        sub.connection_made(FakeTransport())  # type: ignore[arg-type]
        stream = (
            bytes.fromhex("20020000")  # CONNACK
            + wire.publish_batch("bench/in/1", 64, 500)
            + bytes.fromhex("d000")  # PINGRESP in the middle
            + wire.publish_batch("bench/in/22", 64, 300)  # another size
            + wire.publish_packet("x", wire.make_payload(400))
        )
        _feed_in_pieces(sub, stream, piece_bytes)
        assert sub.error is None
        return sub

    sub = asyncio.run(scenario())
    assert sub.received == 801


def test_qos1_subscriber_acknowledges_every_message_and_checks_sequence() -> None:
    async def scenario() -> tuple[clients.Qos1Subscriber, FakeTransport]:
        sub = clients.Qos1Subscriber(wire.MQTT_311)
        transport = FakeTransport()
        sub.connection_made(transport)  # type: ignore[arg-type]
        stream = b"".join(
            wire.publish_packet("q", wire.make_payload(64, 0, seq), 1, packet_id)
            for packet_id, seq in [(1, 0), (2, 1), (3, 1), (4, 3)]  # a duplicate, then seq 2 missing
        )
        _feed_in_pieces(sub, stream, 50)
        return sub, transport

    sub, transport = asyncio.run(scenario())
    assert sub.received == 4
    assert sub.duplicates == 1
    assert sub.gaps == 1
    assert bytes(transport.written) == b"".join(wire.puback_packet(i) for i in (1, 2, 3, 4))


def test_qos1_publisher_keeps_its_window_and_never_uses_packet_id_zero() -> None:
    async def scenario() -> tuple[clients.Qos1Publisher, FakeTransport]:
        pub = clients.Qos1Publisher(wire.MQTT_311, "q", 64, window=3)
        transport = FakeTransport()
        pub.connection_made(transport)  # type: ignore[arg-type]
        pub._next_id = 65_534  # the next ids wrap: 65535, then 1 [MQTT-2.3.1-1]
        pub.start(time.monotonic() + 10, max_messages=5)
        assert pub.in_flight() == 3
        pub.data_received(wire.puback_packet(65_535) + wire.puback_packet(1))
        assert pub.in_flight() == 3
        pub.data_received(wire.puback_packet(2) + wire.puback_packet(3) + wire.puback_packet(4))
        return pub, transport

    pub, transport = asyncio.run(scenario())
    assert (pub.sent, pub.acked) == (5, 5)  # the message bound stops it
    ids = []
    at = 0
    for first_byte, size in _split_stream(bytes(transport.written)):
        assert first_byte == 0x32
        topic_bytes = transport.written[at + 2] << 8 | transport.written[at + 3]
        id_at = at + 4 + topic_bytes
        ids.append(transport.written[id_at] << 8 | transport.written[id_at + 1])
        at += size
    assert ids == [65_535, 1, 2, 3, 4]


# --- procstat ---------------------------------------------------------------------------------


def test_procstat_charges_a_child_to_its_parents_tree() -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nt = time.time()\nwhile time.time() - t < 0.3: pass\ntime.sleep(5)",
        ]
    )
    try:
        before = procstat.sample_tree(child.pid)
        time.sleep(0.5)
        mine = procstat.sample_trees([os.getpid()])
        after = procstat.sample_tree(child.pid)
        assert child.pid in mine.pids  # found as a descendant of this process
        assert after.rss_bytes > 0
        assert 0.05 < procstat.cpu_s_between(before, after) < 1.0
    finally:
        child.kill()
        child.wait()
    assert procstat.sample_tree(child.pid).procs == ()


# --- placing clients on ports ------------------------------------------------------------------


def _ports_by_role(scenario: str, params: Params) -> dict[str, set[int]]:
    ports: dict[str, set[int]] = {"pub": set(), "sub": set()}
    for stage in stages_for(scenario, "127.0.0.1", 1883, params):
        for spec in stage:
            role = "pub" if spec.kind.publishes else "sub" if spec.kind.subscribes else spec.kind.value
            ports.setdefault(role, set()).add(spec.port)
    return ports


@pytest.mark.parametrize("scenario", ["fan-in", "fan-out", "qos1-pairs", "latency"])
def test_publishers_and_subscribers_connect_to_their_own_ports(scenario: str) -> None:
    assert _ports_by_role(scenario, Params()) == {"pub": {1883}, "sub": {1883}}  # default: the broker's
    placed = Params(pub_port=2001, sub_port=2002)
    assert _ports_by_role(scenario, placed) == {"pub": {2001}, "sub": {2002}}
    assert _ports_by_role(scenario, Params(sub_port=2002)) == {"pub": {1883}, "sub": {2002}}


def test_idle_connections_use_the_brokers_port() -> None:
    ports = _ports_by_role("idle-connections", Params(pub_port=2001, sub_port=2002, idle_connections=10))
    assert ports[RoleKind.IDLE.value] == {1883}


def test_loadgen_cli_takes_pub_and_sub_ports() -> None:
    args = loadgen_cli.build_parser().parse_args(
        ["--port", "1883", "--pub-port", "2001", "--sub-port", "2002"]
    )
    assert (args.port, args.pub_port, args.sub_port) == (1883, 2001, 2002)
    args = loadgen_cli.build_parser().parse_args(["--port", "1883"])
    assert (args.pub_port, args.sub_port) == (None, None)


# --- bench helpers ----------------------------------------------------------------------------


def test_default_meshmq_columns_are_one_and_two_workers() -> None:
    specs = bench.broker_specs(bench.build_parser().parse_args([]))
    assert [(s.label, s.args) for s in specs] == [
        ("MeshMQ w1", ("-workers", "1")),
        ("MeshMQ w2", ("-workers", "2")),
        ("Mosquitto", ()),
    ]
    single = bench.broker_specs(bench.build_parser().parse_args(["--meshmq-args=-workers 3"]))
    assert [(s.label, s.args) for s in single] == [("MeshMQ", ("-workers", "3")), ("Mosquitto", ())]


def test_scenario_option_knows_the_cross_worker_scenarios() -> None:
    args = bench.build_parser().parse_args([])
    assert args.scenarios == [
        *SCENARIOS,
        "fan-in-same",
        "fan-in-cross",
        "fan-out-same",
        "fan-out-cross",
        "tls",
        "durable",
        "cluster",
    ]
    assert bench.build_parser().parse_args(["--scenarios", "fan-out-cross"]).scenarios == ["fan-out-cross"]
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--scenarios", "fan-sideways"])
    for cross in bench.CROSS_SCENARIOS:
        assert cross.base in SCENARIOS
        assert cross.name == f"{cross.base}-{'same' if cross.pub_worker == cross.sub_worker else 'cross'}"


def test_free_port_base_gives_consecutive_free_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    base = bench.free_port_base(3)
    assert all(bench.port_free(base + i) for i in (1, 2, 3))
    with socket.socket() as taken:
        taken.bind((bench.HOST, 0))
        taken.listen()
        busy = int(taken.getsockname()[1])
        assert not bench.port_free(busy)
        # Candidates: one whose run holds the busy port, one that is `avoid`, then good ones
        # (several: tests running in parallel may take a port of a block meanwhile).
        goods = [bench.free_port() for _ in range(20)]
        offers = iter([busy - 1, 40_000, *goods])
        monkeypatch.setattr(bench_brokers, "free_port", lambda: next(offers))  # where free_port_base looks
        base = bench.free_port_base(2, avoid=40_000)
        assert base + 1 in goods  # the busy and the avoided candidates were passed over


def test_meshmq_config_sets_worker_ports_and_a_private_ipc_dir(tmp_path: Path) -> None:
    broker = bench.Broker(
        bench.BrokerSpec("MeshMQ cross", "meshmq", ("-workers", "2"), worker_ports=2), tmp_path
    )
    broker.port, broker.worker_port_base = 20000, 21000
    command = broker._command()
    assert command[-2:] == ("-workers", "2")
    config = (tmp_path / "meshmq.yaml").read_text()
    assert "WorkerPortBase: 21000\n" in config
    assert f"IpcDir: {tmp_path / 'ipc'}\n" in config
    assert (broker.worker_port(1), broker.worker_port(2)) == (21001, 21002)
    with pytest.raises(ValueError, match="worker 3"):
        broker.worker_port(3)


def test_process_names_come_from_the_supervisor_log_and_outlive_it(tmp_path: Path) -> None:
    broker = bench.Broker(bench.BrokerSpec("MeshMQ", "meshmq"), tmp_path)
    (tmp_path / "broker.log").write_text(
        "... broker.supervisor: relay started (pid 101)\n"
        "... broker.supervisor: worker 1 started (pid 102)\n"
        "... broker.supervisor: worker 2 started (pid 103)\n"
    )
    assert broker.process_names() == {101: "relay", 102: "worker 1", 103: "worker 2"}
    (tmp_path / "broker.log").unlink()
    assert broker.process_names()[103] == "worker 2"


def _cross_result(
    name: str, rate: float, cpu_us: float | None, by_pid: tuple[tuple[int, float], ...]
) -> ScenarioResult:
    metrics = (
        Metric("received msg/s", rate, "msg/s"),
        Metric("loss", 0.0, "%", "lower"),
        Metric("broker CPU µs/msg", cpu_us, "µs", "lower"),
        Metric("broker CPU", 100.0, "%", ""),
        Metric(bench.PEAK_RSS, 80.0, "MiB", "lower"),
    )
    return ScenarioResult(name, metrics, (), (), by_pid)


def test_cross_table_splits_cpu_by_process_and_gives_the_cross_to_same_ratio(tmp_path: Path) -> None:
    runs = []
    for cross, cpu_us, by_pid in [
        (bench.CROSS_BY_NAME["fan-in-same"], 4.0, ((102, 99.0), (103, 0.2))),
        (bench.CROSS_BY_NAME["fan-in-cross"], 5.0, ((102, 90.0), (103, 70.0), (101, 1.0))),
        (bench.CROSS_BY_NAME["fan-out-same"], 1.0, ((102, 99.0),)),
        (bench.CROSS_BY_NAME["fan-out-cross"], 2.0, ((102, 99.0), (103, 99.0))),
    ]:
        broker = bench.Broker(bench.BrokerSpec("MeshMQ cross", "meshmq", worker_ports=2), tmp_path)
        broker.roles = {101: "relay", 102: "worker 1", 103: "worker 2"}
        broker.results[cross.name] = _cross_result(cross.name, 1000.0, cpu_us, by_pid)
        runs.append((cross, broker))
    assert bench.cross_ratios(runs) == {"fan-in": 1.25, "fan-out": 2.0}
    table = bench.render_cross_table(runs)
    assert "worker 1 90%, worker 2 70%, relay 1%" in table
    assert "worker 2 0%" not in table  # below half a percent: left out
    assert "fan-in 1.25 (met), fan-out 2.00 (MISSED)" in table
    report = bench.to_json([], bench.build_parser().parse_args([]), datetime.now(), runs)
    cross_json = report["cross_worker"]
    assert isinstance(cross_json, dict)
    assert cross_json["cpu_us_per_msg_ratio_cross_to_same"] == {"fan-in": 1.25, "fan-out": 2.0}
    json.dumps(report)


def test_a_stalled_scenario_is_a_problem_and_fails_the_run(tmp_path: Path) -> None:
    broker = bench.Broker(bench.BrokerSpec("MeshMQ cross", "meshmq"), tmp_path)
    broker.results["fan-out-cross"] = _cross_result("fan-out-cross", 0.0, None, ())
    assert bench.stalled(broker.results["fan-out-cross"])
    assert bench.failed([broker])
    assert any("stalled" in line for line in bench.render_problems([broker]))
    assert bench.cross_ratios([(bench.CROSS_BY_NAME["fan-out-cross"], broker)]) == {}


def test_rss_guard_kills_a_process_group_that_bloats() -> None:
    hog = subprocess.Popen(
        [sys.executable, "-c", "import time\nblob = bytearray(200 << 20)\ntime.sleep(30)"],
        start_new_session=True,
    )
    try:
        with bench.RssGuard(hog.pid, 100 << 20) as guard:
            hog.wait(20)
        assert hog.returncode == -signal.SIGKILL
        assert guard.killed_at_bytes is not None and guard.killed_at_bytes > 100 << 20
    finally:
        if hog.poll() is None:
            hog.kill()
            hog.wait()


def test_parse_variants() -> None:
    assert bench.parse_variants("w1:-workers 1; w2:-workers 2 -log DEBUG") == [
        ("w1", ("-workers", "1")),
        ("w2", ("-workers", "2", "-log", "DEBUG")),
    ]
    with pytest.raises(Exception, match="NAME:ARGS"):
        bench.parse_variants("-workers 2")


def test_render_table_has_one_column_per_broker_and_ratios(tmp_path: Path) -> None:
    def broker(label: str, kind: str, value: float | None) -> bench.Broker:
        b = bench.Broker(bench.BrokerSpec(label, kind), tmp_path)
        metrics = (Metric("received msg/s", value, "msg/s"),) if value is not None else ()
        b.results["fan-in"] = ScenarioResult("fan-in", metrics, () if metrics else ("boom",))
        return b

    brokers = [
        broker("MeshMQ w1", "meshmq", 50.0),
        broker("MeshMQ w2", "meshmq", None),
        broker("Mosquitto", "mosquitto", 100.0),
    ]
    table = bench.render_table(brokers, ["fan-in"])
    header, _rule, row = table.splitlines()
    assert header.split() == ["scenario", "metric", "MeshMQ", "w1", "MeshMQ", "w2", "Mosquitto",
                              "MeshMQ", "w1/Mosquitto", "MeshMQ", "w2/Mosquitto"]  # fmt: skip
    assert row.split()[-5:] == ["50.0", "FAILED", "100.0", "0.50", "-"]
    assert bench.failed(brokers)
    assert any("boom" in line for line in bench.render_problems(brokers))


# --- each scenario against mosquitto ------------------------------------------------------------

needs_mosquitto = pytest.mark.skipif(not HAVE_MOSQUITTO, reason=f"{bench.MOSQUITTO} not installed")
QUICK = Params(seconds=1.0, warmup_s=0.3, drain_s=3.0, quiet_s=0.5, idle_connections=200)


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[bench.Broker]:
    broker = bench.Broker(bench.BrokerSpec("Mosquitto", "mosquitto"), tmp_path_factory.mktemp("mosquitto"))
    assert broker.start(), broker.start_error
    yield broker
    broker.stop()
    assert not broker.alive()


def _run(broker: bench.Broker, scenario: str) -> ScenarioResult:
    assert broker.alive()
    result = run_scenario(scenario, bench.HOST, broker.port, QUICK, broker.pid)
    assert result.ok, (result.errors, result.metrics)
    return result


def _value(result: ScenarioResult, name: str) -> float:
    value = result.value(name)
    assert value is not None, f"{result.scenario}: no {name!r} in {result.metrics}"
    return value


@needs_mosquitto
@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["fan-in", "fan-out"])
def test_flood_scenarios(mosquitto: bench.Broker, scenario: str) -> None:
    result = _run(mosquitto, scenario)
    rate_name = "received msg/s" if scenario == "fan-in" else "deliveries/s"
    sent_name = "sent msg/s" if scenario == "fan-in" else "publishes/s"
    assert _value(result, rate_name) > 1000
    assert _value(result, sent_name) > 0
    assert 0 <= _value(result, "loss") < 20  # QoS 0 may drop, but mosquitto keeps up with this
    assert _value(result, "extra deliveries") == 0
    assert _value(result, "broker CPU µs/msg") > 0
    # (reported; a short window on a loaded machine may see no clock tick of a generator process)
    assert _value(result, "generator busiest proc CPU") >= 0
    assert len(result.notes) == len({n.split(":")[0] for n in result.notes}) >= 2


@needs_mosquitto
@pytest.mark.slow
def test_qos1_pairs_arrive_exactly(mosquitto: bench.Broker) -> None:
    result = _run(mosquitto, "qos1-pairs")
    assert _value(result, "msgs/s end to end") > 100
    assert _value(result, "lost msgs") == 0
    assert _value(result, "duplicate msgs") == 0
    assert _value(result, "unacked msgs") == 0
    assert _value(result, "pairs exact") == QUICK.qos1_pairs


@needs_mosquitto
@pytest.mark.slow
def test_latency_is_paced_and_ordered(mosquitto: bench.Broker) -> None:
    result = _run(mosquitto, "latency")
    expected = QUICK.latency_rate_per_s * QUICK.seconds
    assert 0.8 * expected <= _value(result, "samples") <= 1.1 * expected
    assert 0 < _value(result, "p50") <= _value(result, "p99") <= _value(result, "max") < 1000
    assert _value(result, "loss") == 0


@needs_mosquitto
@pytest.mark.slow
def test_idle_connections(mosquitto: bench.Broker) -> None:
    result = _run(mosquitto, "idle-connections")
    assert _value(result, "connected") == QUICK.idle_connections
    assert _value(result, "failed") == 0
    assert _value(result, "connects/s") > 0
    assert result.value("broker RSS per connection") is not None
    assert 0 < _value(result, "connect p50") <= _value(result, "connect max")


@needs_mosquitto
@pytest.mark.slow
def test_bench_reports_a_broker_that_cannot_start_and_writes_json(tmp_path: Path) -> None:
    code = bench.main(
        ["--brokers", "meshmq,mosquitto", "--meshmq-args=-no-such-option", "--scenarios", "latency",
         "--seconds", "0.5", "--warmup", "0.2", "--results-dir", str(tmp_path)]
    )  # fmt: skip
    assert code == 1  # MeshMQ refuses the option: reported, and the run goes on
    (path,) = tmp_path.glob("*.json")
    report = json.loads(path.read_text())
    meshmq, mosquitto = report["brokers"]
    assert meshmq["start_error"]
    assert meshmq["results"]["latency"]["ok"] is False
    assert mosquitto["start_error"] is None
    assert mosquitto["results"]["latency"]["ok"] is True
    assert {m["name"] for m in mosquitto["results"]["latency"]["metrics"]} >= {"p50", "p99", "max"}


def test_scenario_names_are_the_benchs() -> None:
    assert set(bench.RUN_ORDER) == set(SCENARIOS)


# --- cross-worker scenarios against a real two-worker MeshMQ node ---------------------------------


@pytest.mark.slow
def test_cross_worker_scenarios_place_clients_on_the_chosen_workers(tmp_path: Path) -> None:
    code = bench.main(
        ["--brokers", "meshmq", "--scenarios", "fan-in-same,fan-in-cross", "--seconds", "1",
         "--warmup", "0.3", "--results-dir", str(tmp_path)]
    )  # fmt: skip
    (path,) = tmp_path.glob("*.json")
    report = json.loads(path.read_text())
    assert report["brokers"] == []  # cross scenarios only: no main brokers started
    runs = {run["scenario"]: run for run in report["cross_worker"]["runs"]}
    assert set(runs) == {"fan-in-same", "fan-in-cross"}
    for name, run in runs.items():
        assert run["node"]["worker_port_base"] > 0
        assert "-workers" in run["node"]["command"]
        result = run["node"]["results"][name]
        assert result["ok"], result
        metrics = {m["name"]: m["value"] for m in result["metrics"]}
        assert metrics["received msg/s"] > 1000
        assert metrics["broker CPU µs/msg"] > 0
        assert metrics[bench.PEAK_RSS] > 0
    # Same: worker 1 does the work and worker 2 idles; cross: both work.
    same = runs["fan-in-same"]["node"]["results"]["fan-in-same"]["broker_cpu_pct_by_process"]
    cross = runs["fan-in-cross"]["node"]["results"]["fan-in-cross"]["broker_cpu_pct_by_process"]
    # (Relative bounds: the machine is shared, so absolute shares of a core vary.)
    same_w2 = same.get("worker 2", 0.0)
    assert same["worker 1"] > 10 and same_w2 < same["worker 1"] / 4
    assert cross["worker 1"] > 10 and cross["worker 2"] > max(5.0, 4 * same_w2)
    ratio = report["cross_worker"]["cpu_us_per_msg_ratio_cross_to_same"]["fan-in"]
    assert ratio is not None and ratio > 0
    assert code == 0
