"""The deployment files of `etc/`: HAProxy for real in front of a loopback cluster, the rest checked.

Why: issue 6 ("Deployment files") promises that clients connected through the load balancer we
ship fail over to another node when theirs is killed and resume their persistent sessions, and
that a node whose `/health` is not 200 gets no new connections. The cluster test runs Debian's
`haproxy` with `etc/haproxy.cfg` itself (its addresses come from the environment; see
`tests/cluster/haproxy_proc.py`) in front of three real nodes (127.0.0.2..4, one PostgreSQL),
with real MQTT 5 clients. The other tests check what cannot be run here: the compose file, the
Kubernetes manifests and the node configuration they share must agree with each other and with
the broker's configuration loader, and the NGINX file must pass `nginx -t` where nginx exists.

Must not: send traffic anywhere but loopback (HAProxy gets address literals only, no DNS
resolver); install nginx (its check runs only where it is installed); start the system's
haproxy service; sleep-and-hope (every wait is bounded and ends on a condition).

Invariants: the cluster test builds its own cluster (`cluster_factory`) and HAProxy
(`lb_factory`), which the fixtures stop even when it fails; every client is closed at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.config import Config, load_config
from tests.cluster.conftest import ClusterFactory
from tests.cluster.failover_helpers import Receiver, close_all, freeze_child, wait_delivered
from tests.cluster.haproxy_proc import (
    HAPROXY_CFG,
    HAProxy,
    LbEnv,
    check_config,
    ensure_haproxy,
    free_lb_ports,
    free_port_on,
)
from tests.cluster.nodes import CLUSTER_READY, Cluster, Node
from tests.e2e.broker_proc import REPO
from tests.e2e.clients import BrokerAddress, TestClient

ETC = REPO / "etc"
K8S = ETC / "kubernetes"
HTTP_READY = (REPO / "mesh" / "http.py").exists()
LbFactory = Callable[[Cluster, int], HAProxy]

SUBSCRIBERS = 6  # two per node with leastconn
BEFORE = range(0, 10)  # published before the kill
AWAY = range(100, 120)  # while the victim's clients are away
AFTER = range(200, 220)  # once they are back
FINAL = range(300, 310)  # after the clients of a hung node moved too
NEW_CLIENTS = 4  # connecting while one node's /health does not answer


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def haproxy_bin() -> str:
    binary, why = ensure_haproxy()
    if binary is None:
        pytest.skip(why)
    return binary


@pytest.fixture
def lb_factory(haproxy_bin: str, tmp_path: Path) -> Iterator[LbFactory]:
    """`make(cluster, http_port) -> HAProxy`: etc/haproxy.cfg in front of the cluster's three
    nodes, started; stopped at teardown. A port taken meanwhile means new ports (3 attempts)."""
    made: list[HAProxy] = []

    def make(cluster: Cluster, http_port: int) -> HAProxy:
        nodes = tuple(f"{nd.host}:{nd.port}" for nd in cluster.nodes)
        assert len(nodes) == 3, "etc/haproxy.cfg lists three nodes"
        for attempt in range(1, 4):
            bind_port, stats_port = free_lb_ports()
            env = LbEnv(
                f"127.0.0.1:{bind_port}", f"127.0.0.1:{stats_port}", (nodes[0], nodes[1], nodes[2]), http_port
            )
            lb = HAProxy(haproxy_bin, env, tmp_path / f"haproxy-{len(made) + 1}.log")
            made.append(lb)
            try:
                return lb.start()
            except RuntimeError:
                if attempt == 3 or "cannot bind" not in lb.log():
                    raise
        raise AssertionError("unreachable")

    try:
        yield make
    finally:
        for lb in made:
            tail = lb.log_tail()
            if tail:
                print(f"\n=== {lb!r} ===\n{tail}")  # shown by pytest on failure
            lb.stop()


@pytest.fixture
def clients() -> Iterator[list[TestClient]]:
    """Every `TestClient` a test appends here is closed at teardown."""
    made: list[TestClient] = []
    yield made
    close_all(made)


# --- helpers -------------------------------------------------------------------------------------


def _connect(
    made: list[TestClient], broker: BrokerAddress, client_id: str, timeout_s: float = 20.0, **kw: Any
) -> TestClient:
    """A v5 client connected through `broker` (CONNACK 0), retrying as a real client would
    while the cluster settles a dead node (a close, a refusal such as 0x89), within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        client = TestClient(broker, client_id, **kw)
        made.append(client)
        try:
            ack = client.connect(timeout_s=max(0.5, min(5.0, deadline - time.monotonic())))
        except (ConnectionError, AssertionError, OSError) as e:
            outcome: object = e
        else:
            if ack.reason_code == 0:
                return client
            outcome = f"CONNACK {ack.reason_code:#x}"
        client.close()
        if time.monotonic() >= deadline:
            raise AssertionError(f"{client_id}: no CONNACK 0 through {broker.host}:{broker.port} ({outcome})")
        time.sleep(0.1)  # a client's reconnect backoff


def _persistent(made: list[TestClient], broker: BrokerAddress, client_id: str) -> TestClient:
    return _connect(made, broker, client_id, clean_start=False, session_expiry_s=300)


def _marks(nodes: Sequence[Node]) -> dict[str, int]:
    """How many lines each node's current log holds now: search after these for what is new."""
    return {nd.name: nd.log_lines() for nd in nodes}


def _locate(
    nodes: Sequence[Node], client_id: str, after: dict[str, int] | None = None, timeout_s: float = 5.0
) -> Node:
    """The node whose log says `client 'ID' connected` (after the `_marks` given); exactly one."""
    pattern = re.compile(rf"client '{re.escape(client_id)}' connected")
    deadline = time.monotonic() + timeout_s
    while True:
        found = [
            nd
            for nd in nodes
            if any(pattern.search(line) for line in nd.log().splitlines()[(after or {}).get(nd.name, 0) :])
        ]
        if len(found) == 1:
            return found[0]
        if len(found) > 1 or time.monotonic() >= deadline:
            raise AssertionError(f"{client_id} connected on {[nd.name for nd in found]} (wanted one node)")
        time.sleep(0.05)


def _publish(client: TestClient, numbers: range) -> None:
    for n in numbers:
        code = client.publish("hp/all", str(n).encode(), qos=1, timeout_s=10)
        assert code < 0x80, f"PUBACK {code:#x} for {n}"


def _assert_delivered(receivers: Sequence[Receiver], expected: set[int], label: str) -> None:
    checks = wait_delivered(receivers, expected, timeout_s=15)
    for name, check in checks.items():
        print(f"{label} {name}: {check.summary()}")
    lost = {name: list(check.missing[:10]) for name, check in checks.items() if check.missing}
    assert not lost, f"{label}: QoS 1 messages lost: {lost}"


# --- HAProxy in front of a real cluster ------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.e2e
@pytest.mark.postgres
@pytest.mark.skipif(not CLUSTER_READY, reason="mesh/cluster.py does not exist yet")
@pytest.mark.skipif(not HTTP_READY, reason="GET /health is not served yet (mesh/http.py)")
@pytest.mark.timeout(90)
def test_clients_behind_haproxy_fail_over_resume_and_avoid_unhealthy_nodes(
    cluster_factory: ClusterFactory, lb_factory: LbFactory, clients: list[TestClient]
) -> None:
    """Six persistent QoS 1 subscribers connect through HAProxy (etc/haproxy.cfg) and spread over
    the three nodes. The node of the first is SIGKILLed; its clients reconnect through HAProxy
    with clean start 0, land on a survivor, find their session (session present 1) and get every
    QoS 1 message published before, while they were away and after; so does everyone else.
    Then a survivor's relay is frozen (SIGSTOP; its MQTT port still accepts): its /health stops
    answering, HAProxy marks it DOWN and cuts its clients, which resume on the one node left
    (session present 1); every new client goes there too, and no QoS 1 message is lost."""
    started = time.monotonic()
    hosts = [f"127.0.0.{i + 1}" for i in range(1, 4)]
    http_port = free_port_on(hosts)  # one Http.Port for all: each node binds its own address
    c = cluster_factory(n=3, extra=lambda i: {"Http": {"Port": http_port, "BindAddress": f"127.0.0.{i + 1}"}})
    c.wait_members(timeout_s=20)
    lb = lb_factory(c, http_port)
    lb.wait_status({"node1": "UP", "node2": "UP", "node3": "UP"}, timeout_s=10)
    server_of = {nd.name: f"node{nd.index}" for nd in c.nodes}
    print(f"cluster and haproxy up in {time.monotonic() - started:.1f}s")

    # Persistent subscribers through HAProxy; leastconn puts two on each node.
    receivers: dict[str, Receiver] = {}
    placed: dict[str, Node] = {}
    for k in range(SUBSCRIBERS):
        r = Receiver(f"hp-sub-{k}")
        sub = r.add(_persistent(clients, lb, r.name))
        assert not sub.connack.session_present
        assert sub.subscribe("hp/all", qos=1) == [1]
        receivers[r.name] = r
        placed[r.name] = _locate(c.nodes, r.name)
    assert {nd.name for nd in placed.values()} == {nd.name for nd in c.nodes}, (
        f"leastconn should use every node: {[(cid, nd.name) for cid, nd in placed.items()]}"
    )
    publisher = _connect(clients, lb, "hp-pub-1")
    _publish(publisher, BEFORE)
    _assert_delivered(list(receivers.values()), set(BEFORE), "before")

    # SIGKILL the first subscriber's node: its clients are cut (HAProxy passes the close on).
    victim = placed["hp-sub-0"]
    moving = [cid for cid, nd in placed.items() if nd is victim]
    survivors = [nd for nd in c.nodes if nd is not victim]
    victim.kill()
    killed_at = time.monotonic()
    for cid in moving:
        assert receivers[cid].connections[-1].wait_disconnected(timeout_s=10) is None  # a crash
    # Published while they are away, through HAProxy (a fresh connection: the old publisher may
    # have been on the victim); HAProxy must not hand it to the dead node.
    away_pub = _connect(clients, lb, "hp-pub-2")
    _publish(away_pub, AWAY)
    lb.wait_status({server_of[victim.name]: "DOWN"}, timeout_s=10)

    # They come back through HAProxy, same client id, clean start 0: another node, same session.
    marks = _marks(survivors)
    for cid in moving:
        back = receivers[cid].add(_persistent(clients, lb, cid))
        assert back.connack.session_present, f"{cid}: session lost on the way through HAProxy"
        placed[cid] = _locate(survivors, cid, after=marks)
        print(f"{cid}: {victim.name} -> {placed[cid].name}")
    print(
        f"{len(moving)} client(s) of {victim.name} resumed {time.monotonic() - killed_at:.1f}s after the kill"
    )
    _publish(away_pub, AFTER)
    _assert_delivered(list(receivers.values()), set(BEFORE) | set(AWAY) | set(AFTER), "failover")

    # A node whose /health does not answer (relay frozen; its MQTT port still accepts) is marked
    # DOWN: its clients are cut (`on-marked-down shutdown-sessions`) and resume on the other
    # survivor, and every new client goes there too; the hung node is given no connection.
    hung, healthy = survivors
    on_hung = [cid for cid, nd in placed.items() if nd is hung]
    freeze_child(hung, "relay")
    frozen_at = time.monotonic()
    try:
        servers = lb.wait_status({server_of[hung.name]: "DOWN", server_of[healthy.name]: "UP"}, timeout_s=10)
        given_at_down = servers[server_of[hung.name]].sessions_total
        print(f"{hung.name} marked DOWN {time.monotonic() - frozen_at:.1f}s after its relay froze")
        for cid in on_hung:
            receivers[cid].connections[-1].wait_disconnected(timeout_s=10)
        marks = _marks([healthy])
        for cid in on_hung:
            back = receivers[cid].add(_persistent(clients, lb, cid))
            assert back.connack.session_present, f"{cid}: session lost moving off the hung node"
            assert _locate([healthy], cid, after=marks) is healthy
        for k in range(NEW_CLIENTS):
            cid = f"hp-new-{k}"
            _connect(clients, lb, cid, timeout_s=10)
            assert _locate([healthy], cid, after=marks) is healthy
        last_pub = _connect(clients, lb, "hp-pub-3")
        _publish(last_pub, FINAL)
        servers = lb.servers()
        assert servers[server_of[hung.name]].sessions_total == given_at_down, (
            f"HAProxy gave {hung.name} (down) new connections: {servers[server_of[hung.name]]}"
        )
        everything = set(BEFORE) | set(AWAY) | set(AFTER) | set(FINAL)
        _assert_delivered(list(receivers.values()), everything, "health")
        print(
            f"{len(on_hung)} client(s) moved off {hung.name}, {NEW_CLIENTS + 1} new ones all on {healthy.name}"
        )
    finally:
        hung.kill()  # SIGKILL ends the frozen relay too; a SIGTERM drain would wait for it
    print(f"test body {time.monotonic() - started:.1f}s")


# --- the static files --------------------------------------------------------------------------------


def _yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _one(path: Path, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in _yaml_docs(path)
        if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{path.name}: {len(found)} {kind} {name or ''}"
    doc: dict[str, Any] = found[0]
    return doc


def _loopback_env(port_base: int = 18830) -> LbEnv:
    return LbEnv(
        f"127.0.0.1:{port_base}",
        f"127.0.0.1:{port_base + 1}",
        ("127.0.0.2:1883", "127.0.0.3:1883", "127.0.0.4:1883"),
        8080,
    )


def test_haproxy_cfg_is_valid(haproxy_bin: str) -> None:
    """`haproxy -c` accepts etc/haproxy.cfg with the test's loopback addresses, with its own
    example defaults, and with the run-time resolver of the compose file switched on."""
    env = _loopback_env()
    for label, environ in [
        ("loopback", env.environ()),
        ("example defaults", {k: v for k, v in env.environ().items() if not k.startswith("MESHMQ_")}),
        ("resolver", {**env.environ(), "MESHMQ_LB_RESOLVER": "127.0.0.1:53"}),
    ]:
        done = check_config(haproxy_bin, environ)
        assert done.returncode == 0, f"{label}: {done.stdout}{done.stderr}"
        assert "[WARNING]" not in done.stdout + done.stderr, f"{label}: {done.stdout}{done.stderr}"


def test_haproxy_cfg_checks_health_on_the_http_port() -> None:
    """What the failover relies on is in the file: /health on Http.Port decides, a dead node's
    connections are cut, a refused connect goes to another node, idle MQTT is not timed out."""
    text = HAPROXY_CFG.read_text()
    for needed in [
        "mode tcp",
        "balance leastconn",
        "option httpchk GET /health",
        "http-check expect status 200",
        'check port "${MESHMQ_HTTP_PORT-8080}" inter 500ms fall 2 rise 2',
        "on-marked-down shutdown-sessions",
        "option redispatch",
        "timeout client 1h",
        "timeout server 1h",
    ]:
        assert needed in text, f"etc/haproxy.cfg lacks {needed!r}"
    node_yaml = yaml.safe_load((ETC / "cluster-node.yaml").read_text())
    assert node_yaml["Http"]["Port"] == 8080  # the file's default check port
    assert node_yaml["MQTT"]["MaxKeepAlive"] * 1.5 < 3600  # inside `timeout client/server 1h`


def test_nginx_stream_conf_is_valid(tmp_path: Path) -> None:
    """`nginx -t` on etc/nginx-stream.conf included at the top level (only where nginx is installed)."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.skip("nginx is not installed (not installed by the tests)")
    modules = (
        "include /etc/nginx/modules-enabled/*.conf;\n" if Path("/etc/nginx/modules-enabled").is_dir() else ""
    )
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"{modules}pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
        f"events {{}}\ninclude {ETC / 'nginx-stream.conf'};\n"
    )
    done = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_yaml_file_of_etc_parses() -> None:
    files = sorted([*ETC.glob("*.yaml"), *K8S.glob("*.yaml")])
    assert {f.name for f in files} >= {
        "meshmq.yaml",
        "cluster-node.yaml",
        "compose.yaml",
        "configmap.yaml",
        "services.yaml",
        "statefulset.yaml",
        "hpa.yaml",
        "pdb.yaml",
        "kustomization.yaml",
    }
    for f in files:
        assert _yaml_docs(f), f"{f}: no document"


def _load_node_config(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], path: Path) -> Config:
    for name in [n for n in os.environ if n.startswith("MESHMQ_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_config(str(path))


def test_compose_file_runs_three_nodes_with_postgres_and_haproxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each node service uses the image built from etc/Dockerfile, runs cluster-node.yaml as
    mounted, has its own name and lists every node; the file loads with each node's environment;
    HAProxy gets etc/haproxy.cfg and the nodes' addresses; PostgreSQL matches the nodes' URL."""
    compose = yaml.safe_load((ETC / "compose.yaml").read_text())
    services: dict[str, Any] = compose["services"]
    nodes = {name: s for name, s in services.items() if name.startswith("meshmq-")}
    assert sorted(nodes) == ["meshmq-1", "meshmq-2", "meshmq-3"]
    assert {"haproxy", "postgres"} <= set(services)
    pg = services["postgres"]["environment"]
    for name, s in nodes.items():
        assert s["image"] == "meshmq:latest"
        assert s["build"] == {"context": "..", "dockerfile": "etc/Dockerfile"}
        assert (ETC / s["build"]["context"] / s["build"]["dockerfile"]).resolve() == ETC / "Dockerfile"
        command = s["command"]
        assert (
            command[0] == "-cluster"
            and command[command.index("-config") + 1] == "/etc/meshmq/cluster-node.yaml"
        )
        assert "./cluster-node.yaml:/etc/meshmq/cluster-node.yaml:ro" in s["volumes"]
        env = {k: str(v) for k, v in s["environment"].items()}
        assert env["MESHMQ_NODE_NAME"] == s["hostname"] == name
        assert env["MESHMQ_MEMBERS"].split(",") == sorted(nodes)
        assert s["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert "8080/health" in " ".join(s["healthcheck"]["test"])
        # Compose itself fills ${POSTGRES_PASSWORD:-meshmq}; what the node then sees:
        env = {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", v) for k, v in env.items()}
        config = _load_node_config(monkeypatch, env, ETC / "cluster-node.yaml")
        assert config.cluster and config.node_name == name
        assert config.mesh.tcp_ip.members == tuple(sorted(nodes)) and not config.mesh.dns.enabled
        assert config.http.port == 8080 and config.tcp_port == 1883
        assert config.session_store.postgres.url == f"postgresql://postgres:5432/{pg['POSTGRES_DB']}"
        assert config.session_store.postgres.user == pg["POSTGRES_USER"]
    lb = services["haproxy"]
    assert "./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in lb["volumes"]
    assert [lb["environment"][f"MESHMQ_NODE{i}"] for i in (1, 2, 3)] == [f"{n}:1883" for n in sorted(nodes)]
    assert str(lb["environment"]["MESHMQ_HTTP_PORT"]) == "8080"


def _container(sts: dict[str, Any]) -> dict[str, Any]:
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    c: dict[str, Any] = container
    return c


def test_kubernetes_manifests_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """The StatefulSet finds its peers through the headless service (listing not-ready pods),
    probes /health on Http.Port, reads the PostgreSQL URL and the CURVE key from Secrets, runs
    the ConfigMap that is etc/cluster-node.yaml, and the HPA, PDB and client Service select it;
    no manifest names a namespace; the node configuration loads with the pod's environment."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    assert "secret.example.yaml" not in kustomization["resources"]
    for f in K8S.glob("*.yaml"):
        for doc in _yaml_docs(f):
            assert "namespace" not in doc.get("metadata", {}), f"{f.name}: names a namespace"

    sts = _one(K8S / "statefulset.yaml", "StatefulSet", "meshmq")
    headless = _one(K8S / "services.yaml", "Service", sts["spec"]["serviceName"])
    client = _one(K8S / "services.yaml", "Service", "meshmq")
    configmap = _one(K8S / "configmap.yaml", "ConfigMap")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["podManagementPolicy"] == "Parallel"
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    for svc in (headless, client):
        assert svc["spec"]["selector"].items() <= labels.items()
    assert [p["port"] for p in client["spec"]["ports"]] == [1883]

    c = _container(sts)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"mqtt": 1883, "mesh": 7946, "http": 8080}
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert "/health" in " ".join(c["livenessProbe"]["exec"]["command"])
    env = {e["name"]: e for e in c["env"]}
    assert env["MESHMQ_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["MESHMQ_DNS_NAMES"]["value"] == headless["metadata"]["name"]
    assert env["MESHMQ_PG_URL"]["valueFrom"]["secretKeyRef"] == {"name": "meshmq-postgres", "key": "url"}
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    key_file = Path(env["MESHMQ_CURVE_KEY_FILE"]["value"])
    assert (
        mounts["curve"] == str(key_file.parent) and volumes["curve"]["secret"]["secretName"] == "meshmq-curve"
    )
    example = _one(K8S / "secret.example.yaml", "Secret", "meshmq-curve")
    assert key_file.name in example["stringData"]
    assert "url" in _one(K8S / "secret.example.yaml", "Secret", "meshmq-postgres")["stringData"]
    config_path = Path(c["args"][c["args"].index("-config") + 1])
    assert c["args"][0] == "-cluster" and mounts["config"] == str(config_path.parent)
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert configmap["data"][config_path.name] == (ETC / "cluster-node.yaml").read_text(), (
        "etc/kubernetes/configmap.yaml must hold etc/cluster-node.yaml unchanged"
    )
    grace = sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]

    pod_env = {
        "MESHMQ_NODE_NAME": "meshmq-0",
        "MESHMQ_ADVERTISE_ADDRESS": "10.244.1.7",
        "MESHMQ_PG_URL": "postgresql://meshmq:pw@postgres:5432/meshmq",
        "MESHMQ_WORKERS": "2",
        **{name: e["value"] for name, e in env.items() if "value" in e},
    }
    config = _load_node_config(monkeypatch, pod_env, ETC / "cluster-node.yaml")
    assert config.cluster and config.node_name == "meshmq-0" and config.workers == 2
    assert config.mesh.dns.enabled and config.mesh.dns.names == (headless["metadata"]["name"],)
    assert config.mesh.advertise_address == "10.244.1.7" and config.mesh.curve.key_file == str(key_file)
    assert (
        config.http.port == ports["http"]
        and config.tcp_port == ports["mqtt"]
        and config.mesh.port == ports["mesh"]
    )
    assert grace > config.shutdown_grace_s

    hpa = _one(K8S / "hpa.yaml", "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", sts["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] == sts["spec"]["replicas"]
    pdb = _one(K8S / "pdb.yaml", "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_dockerfile_copies_what_exists_and_runs_meshmq() -> None:
    text = (ETC / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY") and "--from=" not in line:
            *sources, _target = line.split()[1:]
            for source in sources:
                assert (REPO / source).exists(), f"etc/Dockerfile copies {source}, which does not exist"
    assert 'ENTRYPOINT ["meshmq"]' in text
    assert 'meshmq = "broker.cli:main"' in (REPO / "pyproject.toml").read_text()
