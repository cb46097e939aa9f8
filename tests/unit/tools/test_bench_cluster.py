"""tools.loadgen.cluster and its place in tools.bench: configurations, placements, the figures
from the counts, the table, the JSON and the exit status. Parsing and rendering only: nothing here
starts a node or measures time (the group runs for real under `make bench`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from broker.config import parse_config
from tools import bench
from tools.loadgen import cluster
from tools.loadgen.cluster import ClusterResult, ClusterRun, NodeAddress
from tools.loadgen.runner import RunOutcome
from tools.loadgen.scenarios import Metric, ScenarioResult
from tools.loadgen.worker import ConnectionCounts, RoleKind, WorkerResult, WorkerSpec

NODES = (
    NodeAddress("n1", "127.0.0.2", 20001, 20002),
    NodeAddress("n2", "127.0.0.3", 20003, 20004),
    NodeAddress("n3", "127.0.0.4", 20005, 20006),
)


# --- bench options -------------------------------------------------------------------------------


def test_cluster_is_a_bench_scenario_run_by_default_and_selectable_alone() -> None:
    parser = bench.build_parser()
    assert cluster.SCENARIO in parser.parse_args([]).scenarios
    assert parser.parse_args(["--scenarios", "cluster"]).scenarios == ["cluster"]


# --- the nodes -----------------------------------------------------------------------------------


def test_node_config_is_a_valid_cluster_configuration(tmp_path: Path) -> None:
    data = cluster.node_config(NODES[1], NODES, "postgresql://u@127.0.0.1:5/db", tmp_path / "ipc", "bench-x")
    config = parse_config(yaml.safe_load(yaml.safe_dump(data)), "n2.yaml")
    assert (config.node_name, config.listen_address, config.tcp_port, config.workers) == (
        "n2",
        "127.0.0.3",
        20003,
        1,
    )
    assert config.session_store.type.name == "POSTGRES"
    mesh = config.mesh
    assert (mesh.cluster_name, mesh.port, mesh.bind_address, mesh.plaintext) == (
        "bench-x",
        20004,
        "127.0.0.3",
        True,
    )
    assert mesh.tcp_ip.members == ("127.0.0.2:20002", "127.0.0.3:20004", "127.0.0.4:20006")
    assert mesh.ipc_dir == str(tmp_path / "ipc")


def test_free_addresses_put_each_node_on_its_own_loopback_address_with_distinct_ports() -> None:
    nodes = cluster.free_addresses()
    assert [(n.name, n.host) for n in nodes] == [
        ("n1", "127.0.0.2"),
        ("n2", "127.0.0.3"),
        ("n3", "127.0.0.4"),
    ]
    ports = [p for n in nodes for p in (n.port, n.mesh_port)]
    assert len(set(ports)) == 6 and all(0 < p < 65536 for p in ports)


def test_latest_view_is_the_last_view_line() -> None:
    log = (
        "relay: cluster view: alive=[n1]\n"
        "x\n"
        "relay: cluster view: alive=[n1, n2, n3]\n"
        "relay: cluster view: alive=[n1, n3]\n"
    )
    assert cluster.latest_view(log) == frozenset({"n1", "n3"})
    assert cluster.latest_view("nothing yet\n") is None


def test_process_names_come_from_the_launcher_and_the_node_logs() -> None:
    launcher = "node n1 pid 100\nnode n2 pid 200\nparent gone\n"
    logs = {
        "n1": "supervisor: relay started (pid 101)\nsupervisor: worker 1 started (pid 102)\n",
        "n2": "supervisor: store started (pid 203)\n",
    }
    assert cluster.process_names(launcher, logs) == {
        100: "n1 supervisor",
        101: "n1 relay",
        102: "n1 worker 1",
        200: "n2 supervisor",
        203: "n2 store",
    }


def test_membership_events_are_the_suspect_and_dead_lines() -> None:
    log = (
        "relay mesh.cluster: node n1 is SUSPECT (nothing heard for 1.5s)\n"
        "relay mesh.cluster: node n3 is DEAD (nothing heard for 4.0s)\n"
        "relay mesh.relay: node n3 is dead: recovering its wills and sessions here\n"
    )
    assert cluster.membership_events("n2", log) == ["n2 saw n1 SUSPECT", "n2 saw n3 DEAD"]


# --- placements ----------------------------------------------------------------------------------


def _subs(stages: list[list[WorkerSpec]]) -> list[WorkerSpec]:
    return [s for stage in stages for s in stage if s.kind.subscribes]


@pytest.mark.parametrize(
    ("same_name", "cross_name", "kind"),
    [
        (cluster.FANOUT_SAME, cluster.FANOUT, RoleKind.PUBLISH_QOS0),
        (cluster.PACED_SAME, cluster.PACED, RoleKind.PUBLISH_PACED),
    ],
)
def test_fanout_same_and_cross_differ_only_in_where_the_subscribers_are(
    same_name: str, cross_name: str, kind: RoleKind
) -> None:
    params = cluster.ClusterParams(paced_rate_per_s=1250.0)
    same = cluster.fanout_stages(NODES, same_name, params)
    cross = cluster.fanout_stages(NODES, cross_name, params)
    for stages in (same, cross):
        subs, pubs = stages
        assert all(s.kind is RoleKind.SUBSCRIBE_COUNT for s in subs)
        assert [p.kind for p in pubs] == [kind]
        assert pubs[0].host == "127.0.0.2" and pubs[0].topics == (cluster.FAN_TOPIC,) * 4
        assert pubs[0].payload_bytes == 64 and pubs[0].qos == 0
        if kind is RoleKind.PUBLISH_PACED:
            assert pubs[0].rate_per_s == 1250.0
    # the same deliveries per message and generator processes in both runs
    assert [len(s.topics) for s in _subs(same)] == [len(s.topics) for s in _subs(cross)] == [10, 10]
    assert {s.host for s in _subs(same)} == {"127.0.0.2"}
    assert [(s.host, s.port) for s in _subs(cross)] == [("127.0.0.3", 20003), ("127.0.0.4", 20005)]
    assert cluster.placement(same) == "4 pub n1 -> 20 sub n1"
    assert cluster.placement(cross) == "4 pub n1 -> 10 sub n2, 10 sub n3"


def test_latency_stages_pace_one_publisher_on_n1_at_the_given_rate() -> None:
    subs, pubs = cluster.latency_stages(NODES, cluster.ClusterParams(latency_rate_per_s=1000.0))
    assert [(s.kind, s.host) for s in subs] == [
        (RoleKind.SUBSCRIBE_LATENCY, "127.0.0.2"),
        (RoleKind.SUBSCRIBE_LATENCY, "127.0.0.3"),
        (RoleKind.SUBSCRIBE_LATENCY, "127.0.0.4"),
    ]
    assert [(p.kind, p.host, p.rate_per_s) for p in pubs] == [(RoleKind.PUBLISH_PACED, "127.0.0.2", 1000.0)]


# --- figures from counts -------------------------------------------------------------------------


def _result(
    spec: WorkerSpec, counts: list[ConnectionCounts], latencies_ns: tuple[int, ...] = ()
) -> WorkerResult:
    return WorkerResult(spec.name, 1, 2.0, tuple(counts), latencies_ns)


def _outcome(pairs: list[tuple[WorkerSpec, WorkerResult]], broker_cpu_s: float) -> RunOutcome:
    return RunOutcome(tuple(pairs), (), 2.0, broker_cpu_s, None, None, 0.5, 0.3)


def test_fanout_figures_count_deliveries_loss_and_cpu_per_delivery() -> None:
    (sub_a, sub_b), (pub,) = cluster.fanout_stages(NODES, cluster.FANOUT, cluster.ClusterParams())
    # 1,000 publishes per connection, 4 connections: 4,000 messages x 20 subscribers = 80,000 expected
    pubs = [ConnectionCounts(sent=1000, sent_window=500)] * 4
    subs = [ConnectionCounts(received=4000, received_window=2000)] * 10
    lossy = [ConnectionCounts(received=3000, received_window=2000)] * 10
    outcome = _outcome(
        [(pub, _result(pub, pubs)), (sub_a, _result(sub_a, subs)), (sub_b, _result(sub_b, lossy))], 0.8
    )
    metrics = {m.name: m.value for m in cluster.outcome_metrics(cluster.FANOUT, outcome)}
    assert cluster.outcome_metrics(cluster.FANOUT, outcome)[0].name == "deliveries/s"
    assert metrics["deliveries/s"] == 20 * 2000 / 2.0
    assert metrics["publishes/s"] == 4 * 500 / 2.0
    assert metrics["loss"] == pytest.approx(100 * 10_000 / 80_000)
    assert metrics["extra deliveries"] == 0
    assert metrics[cluster.CPU_PER_DELIVERY] == pytest.approx(1e6 * 0.8 / 40_000)  # 20,000 deliveries/s x 2 s
    assert metrics["cluster CPU"] == pytest.approx(40.0)
    assert metrics["generator busiest proc CPU"] == pytest.approx(15.0)


def test_latency_figures_split_cross_node_from_the_same_node_reference() -> None:
    (s1, s2, s3), (pub,) = cluster.latency_stages(NODES, cluster.ClusterParams())
    ms = 1_000_000
    counts = [ConnectionCounts(received=100, received_window=100)]
    outcome = _outcome(
        [
            (pub, _result(pub, [ConnectionCounts(sent=100, sent_window=100)])),
            (s1, _result(s1, counts, tuple([ms // 10] * 100))),
            (s2, _result(s2, counts, tuple([1 * ms] * 99 + [9 * ms]))),
            (s3, _result(s3, counts, tuple([2 * ms] * 98 + [3 * ms, 5 * ms]))),
        ],
        0.1,
    )
    metrics = {m.name: m.value for m in cluster.outcome_metrics(cluster.LATENCY, outcome)}
    # the 200 cross-node samples, sorted: 99 x 1 ms, 98 x 2 ms, 3, 5, 9 ms (nearest rank)
    assert metrics["p50"] == pytest.approx(2.0)
    assert metrics["p99"] == pytest.approx(3.0)
    assert metrics["max"] == pytest.approx(9.0)
    assert metrics["p99 n2"] == pytest.approx(1.0) and metrics["p99 n3"] == pytest.approx(3.0)
    assert metrics["p99 same-node n1"] == pytest.approx(0.1)
    assert metrics["samples"] == 200
    assert metrics["loss"] == 0
    assert metrics[cluster.CPU_PER_DELIVERY] == pytest.approx(1e6 * 0.1 / 300)


# --- verdicts, table, JSON -----------------------------------------------------------------------


def _run(scenario: str, *metrics: Metric, errors: tuple[str, ...] = ()) -> ClusterRun:
    return ClusterRun(
        scenario,
        "4 pub n1 -> 10 sub n2, 10 sub n3",
        ScenarioResult(scenario, metrics, errors),
        (("n1 worker 1", 80.0), ("n2 relay", 30.0)),
    )


def _full(cross_us: float = 2.0, p99_ms: float = 1.5) -> ClusterResult:
    return ClusterResult(
        (
            _run(cluster.LATENCY, Metric("p50", 0.6, "ms", "lower"), Metric("p99", p99_ms, "ms", "lower")),
            _run(
                cluster.PACED_SAME,
                Metric("deliveries/s", 1e5, "msg/s"),
                Metric(cluster.CPU_PER_DELIVERY, 2.0, "µs"),
            ),
            _run(
                cluster.PACED,
                Metric("deliveries/s", 1e5, "msg/s"),
                Metric(cluster.CPU_PER_DELIVERY, 14.0, "µs"),
            ),
            _run(
                cluster.FANOUT_SAME,
                Metric("deliveries/s", 900_000.0, "msg/s"),
                Metric(cluster.CPU_PER_DELIVERY, 1.0, "µs"),
            ),
            _run(
                cluster.FANOUT,
                Metric("deliveries/s", 400_000.0, "msg/s"),
                Metric(cluster.CPU_PER_DELIVERY, cross_us, "µs"),
            ),
        ),
        nodes=NODES,
        idle_cpu_pct=8.0,
    )


def test_ratio_and_targets() -> None:
    met = _full(cross_us=2.0, p99_ms=1.5)
    assert met.cpu_ratio() == pytest.approx(2.0) and met.p99_ms() == 1.5
    assert met.cpu_ratio("paced") == pytest.approx(7.0)
    assert cluster.verdicts(met) == [
        "p99 across nodes at 1,000 msg/s: 1.5 ms (target < 2 ms: met)",
        "cluster CPU per delivery, cross-node / same-node, flooding (cluster-fanout / cluster-fanout-same):"
        " 2 (target <= 2: met)",
        "cluster CPU per delivery, cross-node / same-node, paced (cluster-paced / cluster-paced-same):"
        " 7 (target <= 2: MISSED)",
    ]
    missed = cluster.verdicts(_full(cross_us=2.5, p99_ms=2.0))
    assert all(line.endswith("MISSED)") for line in missed)
    assert not met.failed


def test_render_lists_every_run_with_its_placement_then_targets_and_cpu_by_process() -> None:
    text = cluster.render(_full())
    lines = text.splitlines()
    assert lines[0].split() == ["scenario", "clients", "metric", "value"]
    assert any(line.startswith("cluster-fanout ") and "400,000" in line for line in lines)
    assert "p99 (ms)" in text and "cluster CPU µs/delivery" in text and "(µs)" not in text
    assert "target < 2 ms: met" in text and "2 (target <= 2: met)" in text
    assert "cluster-fanout CPU by process: n1 worker 1 80%, n2 relay 30%" in text
    assert "idle cluster CPU" in text and "problems:" not in text


def test_membership_events_during_a_run_are_a_warning_not_a_failure() -> None:
    run = ClusterRun(
        cluster.FANOUT,
        "4 pub n1 -> 10 sub n2, 10 sub n3",
        ScenarioResult(
            cluster.FANOUT,
            (Metric("deliveries/s", 1.0, "msg/s"), Metric(cluster.FLAPS, 2.0, "events", "lower")),
            (),
            ("cluster-fanout/publish-qos0/n1/0: 3% CPU", "n2 saw n1 SUSPECT", "n3 saw n1 DEAD"),
        ),
    )
    result = ClusterResult((run,))
    assert "warning: 2 peer SUSPECT/DEAD event(s) among live nodes (n2 saw n1 SUSPECT, n3 saw n1 DEAD)" in (
        cluster.render(result)
    )
    assert not result.failed


def test_failures_and_stalls_are_problems_and_fail_the_group() -> None:
    result = ClusterResult(
        (
            _run(cluster.LATENCY, errors=("a node exited during the run",)),
            _run(cluster.FANOUT, Metric("deliveries/s", 0.0, "msg/s")),
        ),
        errors=("RuntimeError: the nodes do not all see ['n1', 'n2', 'n3']",),
    )
    text = cluster.render(result)
    assert "FAILED" in text
    assert "cluster: RuntimeError" in text
    assert "cluster-latency: a node exited during the run" in text
    assert "cluster-fanout: nothing measured in the window (stalled)" in text
    assert result.failed and result.cpu_ratio() is None
    assert cluster.verdicts(result)[0].endswith("(target < 2 ms: -)")


def test_as_json_carries_the_figures_targets_and_nodes() -> None:
    report = json.loads(json.dumps(cluster.as_json(_full()), ensure_ascii=False))
    assert report["cpu_us_per_delivery_ratio_cross_to_same"] == {
        "flooding": pytest.approx(2.0),
        "paced": pytest.approx(7.0),
    }
    assert report["p99_ms_across_nodes"] == 1.5
    assert report["targets"] == {"p99_ms_below": 2.0, "cpu_ratio_at_most": 2.0}
    assert [n["host"] for n in report["nodes"]] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    fanout = report["runs"][4]
    assert fanout["scenario"] == "cluster-fanout" and fanout["ok"] is True
    assert fanout["cpu_pct_by_process"] == {"n1 worker 1": 80.0, "n2 relay": 30.0}
    assert {"name": "deliveries/s", "value": 400_000.0, "unit": "msg/s", "better": "higher"} in fanout[
        "metrics"
    ]


# --- tools.bench files and prints the group ------------------------------------------------------


@pytest.mark.parametrize(("cross_us", "status"), [(2.0, 0), (None, 1)])
def test_bench_prints_and_files_the_cluster_group(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    cross_us: float | None,
    status: int,
) -> None:
    given: list[cluster.ClusterParams] = []

    def fake_run(params: cluster.ClusterParams) -> ClusterResult:
        given.append(params)
        return _full() if cross_us is not None else ClusterResult((), ("RuntimeError: no database",))

    monkeypatch.setattr(cluster, "run_cluster", fake_run)
    code = bench.main(
        ["--scenarios", "cluster", "--seconds", "2", "--warmup", "0.5", "--results-dir", str(tmp_path)]
    )
    assert code == status
    assert given[0].seconds == 2 and given[0].warmup_s == 0.5
    out = capsys.readouterr().out
    assert cluster.TITLE in out
    (path,) = tmp_path.glob("*.json")
    report = json.loads(path.read_text())
    assert report["cluster"]["errors"] == ([] if status == 0 else ["RuntimeError: no database"])
