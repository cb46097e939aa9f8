"""What the relay shows on the node's HTTP port: health, metrics, members, routes, sessions.

(Users and ACL rules, asked from the store: `mesh/relay_users.py`, a base of `RelayView`.)

Why: the relay holds the node's view of itself and of the cluster (membership, routes, the
client registry, retained messages) and hears every worker's counters once a second (`stats`),
so it answers `mesh/http.py`'s `NodeView`. The HTTP server runs in its own thread: every answer
is built under `self.lock`, which the relay loop holds while it works, and requests that need the
loop (a ping, a drain of another node) are queued for it.

Must not: block the relay loop; change relay state from the HTTP thread except through the
request queue.

Invariants: `/health` is 200 only when the node is ACTIVE (every worker joined, not draining), the
cluster is safe (split-brain protection) and the store answers; the figures in `/metrics` are the
workers' last reports (at most one heartbeat old) and the relay's own.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq

from mesh import envelope as env
from mesh.errors import EnvelopeError
from mesh.peers import State
from mesh.relay_users import RelayUsers
from mesh.routes import RouteTable
from mesh.sockets import endpoint

if TYPE_CHECKING:
    from mesh.cluster import ClusterLinks
    from mesh.relay import RelaySettings, RelayState
    from mesh.relay_cluster import ClusterState

STATS_STALE_S = 5.0  # a worker report older than this is left out of /metrics


class RelayView(RelayUsers):
    """Mixed into `Relay` (NodeView of mesh/http.py; users and ACL rules: mesh/relay_users.py)."""

    settings: RelaySettings
    state: RelayState
    cluster: ClusterState
    links: ClusterLinks | None
    node: str
    draining: bool
    minority: bool
    ctx: zmq.Context[zmq.Socket[bytes]]
    store_stats: dict[str, object]

    def init_view(self) -> None:
        self.lock = threading.RLock()  # (the loop, holding it, also builds $SYS from the same views)
        self.worker_stats: dict[int, tuple[dict[str, int], dict[str, int], float]] = {}
        self.requests: queue.SimpleQueue[tuple[str, str, threading.Event, list[float]]] = queue.SimpleQueue()
        self.started_at = time.time()

    # -- fed by the loop --------------------------------------------------------------------------

    def worker_reported(self, index: int, counters: object, gauges: object, now: float) -> None:
        if isinstance(counters, dict) and isinstance(gauges, dict):
            self.worker_stats[index] = (counters, gauges, now)

    def serve_requests(self) -> None:
        """Run what the HTTP thread asked of the loop (pings, drains of other nodes)."""
        while True:
            try:
                kind, node, done, result = self.requests.get_nowait()
            except queue.Empty:
                return
            links = self.links
            peer = None if links is None else links.peers.get(node)
            if links is None or peer is None or not peer.routable:
                done.set()
                continue
            if kind == "ping":
                links.ping(peer, _answer(done, result))
            elif kind == "drain":
                links.ask_drain(peer)
                result.append(0.0)
                done.set()

    # -- NodeView ---------------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, object]]:
        with self.lock:
            joined = len(self.state.workers) >= self.settings.worker_count
            node_state = "DRAINING" if self.draining else ("ACTIVE" if joined else "STARTING")
            alive = self.links.alive() if self.links is not None else [self.node]
            known = 1 + (
                sum(1 for p in self.links.peers.values() if p.state is not State.LEFT) if self.links else 0
            )
            safe = not self.minority
            store = self._store_status()
            body: dict[str, object] = {
                "node": self.node,
                "version": self.settings.version,
                "nodeState": node_state,
                "clusterState": "STANDALONE" if self.links is None else ("SAFE" if safe else "MINORITY"),
                "clusterSafe": safe,
                "nodeCount": len(alive),
                "clusterSize": known,
                "store": store,
                "workers": len(self.state.workers),
            }
        return node_state == "ACTIVE" and safe and store != "down", body

    def _store_status(self) -> str:
        if not self.settings.store:
            return "none"
        if self.store_stats.get("degraded"):
            return "degraded"
        now = time.monotonic()
        waits = [
            g.get("store_wait_ms", 0) for _c, g, at in self.worker_stats.values() if now - at < STATS_STALE_S
        ]
        worst = max(waits, default=0)
        return "down" if worst >= 5000 else ("degraded" if worst >= 1000 else "ok")

    def members(self) -> list[dict[str, object]]:
        with self.lock:
            own: dict[str, object] = {
                "name": self.node,
                "address": ""
                if self.links is None
                else f"{self.links.settings.advertise_host}:{self.links.settings.port}",
                "state": "DRAINING" if self.draining else "ALIVE",
                "incarnation": 0 if self.links is None else self.links.incarnation,
                "rttMs": 0.0,
                "clients": len(self.state.registry),
                "self": True,
            }
            rows: list[dict[str, object]] = [own]
            if self.links is not None:
                per_node: dict[str, int] = {}
                for name, _epoch in self.cluster.remote_clients.values():
                    per_node[name] = per_node.get(name, 0) + 1
                for peer in sorted(self.links.peers.values(), key=lambda p: p.name):
                    rows.append(
                        {
                            "name": peer.name,
                            "address": f"{peer.host}:{peer.port}",
                            "state": peer.state.value,
                            "incarnation": peer.incarnation,
                            "rttMs": round(peer.rtt_ms, 3),
                            "clients": per_node.get(peer.name, 0),
                            "self": False,
                        }
                    )
        return rows

    def routes(self, topic_filter: str | None) -> list[dict[str, object]]:
        with self.lock:
            table: dict[str, set[str]] = {f: {self.node} for f in self.cluster.local_routes}
            for route, node in self.cluster.routes.all_filters():
                table.setdefault(route, set()).add(node)
        wanted = _selector(topic_filter)
        return [{"filter": f, "nodes": sorted(nodes)} for f, nodes in sorted(table.items()) if wanted(f)]

    def sessions(self, client_id: str | None) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = []
        with self.lock:
            for cid, (worker, epoch) in self.state.registry.items():
                rows.append(
                    {"clientId": cid, "node": self.node, "worker": worker, "epoch": epoch, "online": True}
                )
            for cid, (node, epoch) in self.cluster.remote_clients.items():
                rows.append({"clientId": cid, "node": node, "worker": None, "epoch": epoch, "online": True})
        if client_id is not None:
            rows = [r for r in rows if r["clientId"] == client_id]
        stored = self._stored_sessions(client_id)
        for row in rows:  # queued rows of the connected ones
            info = stored.pop(str(row["clientId"]), None)
            row["queued"] = None if info is None else info[3]
        for cid, (online, node, expiry_s, queued) in stored.items():  # the offline persistent ones
            if not online:
                rows.append(
                    {
                        "clientId": cid,
                        "node": node,
                        "worker": None,
                        "epoch": None,
                        "online": False,
                        "queued": queued,
                        "expiryS": expiry_s,
                    }
                )
        return sorted(rows, key=lambda r: str(r["clientId"]))

    def _stored_sessions(self, client_id: str | None) -> dict[str, tuple[bool, str, int, int]]:
        """The store's sessions (all, up to its limit, or one): asked from the HTTP thread on a
        socket of its own (ZeroMQ sockets are not shared between threads)."""
        if not self.settings.store:
            return {}
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            dealer.connect(endpoint(self.settings.ipc_dir, "store.ctl"))
            dealer.send(env.pack_control("sinfo", 1, client_id))
            if not dealer.poll(2000):
                return {}
            control = env.unpack_control(dealer.recv())
        except (zmq.ZMQError, EnvelopeError):
            return {}
        finally:
            dealer.close(0)
        if control.kind != "sessinfo" or not isinstance(control.body[0], tuple):
            return {}
        return {str(c): (bool(on), str(node), int(exp), int(q)) for c, on, node, exp, q in control.body[0]}

    def retained(self, topic_filter: str | None) -> dict[str, object]:
        wanted = _selector(topic_filter)
        with self.lock:
            items = [(t, item) for t, (item, _at) in self.state.retained.items() if wanted(t)]
        items.sort(key=lambda pair: pair[0])
        return {
            "count": len(items),
            "topics": [{"topic": t, "qos": item[0], "bytes": len(item[2])} for t, item in items[:1000]],
        }

    def stats(self) -> dict[str, object]:
        with self.lock:
            workers = {str(i): {**c, **g} for i, (c, g, _at) in sorted(self.worker_stats.items())}
            node: dict[str, int] = {}
            for c, g, _at in self.worker_stats.values():
                for key, value in (*c.items(), *g.items()):
                    node[key] = node.get(key, 0) + int(value)
            node["retained_messages"] = len(self.state.retained)
            links: dict[str, object] = {}
            if self.links is not None:
                node.update({f"mesh_{k}": v for k, v in self.links.counters.items()})
                for peer in self.links.peers.values():
                    out = peer.out
                    links[peer.name] = {
                        "state": peer.state.value,
                        "sent": 0 if out is None else out.seq,
                        "acked": 0 if out is None else out.acked,
                        "unacked": 0 if out is None else out.unacked,
                        "received": peer.inn.applied,
                        "dropped": peer.dropped,
                        "rttMs": round(peer.rtt_ms, 3),
                    }
        return {"node": node, "workers": workers, "links": links}

    def metrics(self) -> str:
        stats = self.stats()
        healthy, health = self.health()
        node = self.node
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
            lines.append(f"# HELP meshmq_{name} {help_text}")
            lines.append(f"# TYPE meshmq_{name} {kind}")
            for labels, value in samples:
                text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                lines.append(f"meshmq_{name}{{{text}}} {value}")

        workers = stats["workers"]
        assert isinstance(workers, dict)
        names = sorted({k for w in workers.values() for k in w})
        # The workers' `limit_<name>` counters (broker/limits.py) are one family, by limit.
        limits = [k for k in names if k.startswith(_LIMIT_PREFIX)]
        if limits:
            metric(
                "limit_refusals_total",
                "counter",
                "requests refused by a Limits setting",
                [
                    ({"node": node, "worker": w, "limit": k[len(_LIMIT_PREFIX) :]}, values.get(k, 0))
                    for k in limits
                    for w, values in workers.items()
                ],
            )
        for key in names:
            if key.startswith(_LIMIT_PREFIX):
                continue
            gauge = key in _GAUGES
            metric(
                key if gauge else f"{key}_total",
                "gauge" if gauge else "counter",
                key.replace("_", " "),
                [({"node": node, "worker": w}, values.get(key, 0)) for w, values in workers.items()],
            )
        metric("up", "gauge", "1 when this node should get traffic", [({"node": node}, float(healthy))])
        metric(
            "cluster_safe",
            "gauge",
            "1 unless split-brain protection holds the node back",
            [({"node": node}, float(bool(health["clusterSafe"])))],
        )
        metric(
            "cluster_nodes_alive",
            "gauge",
            "live members seen, self included",
            [({"node": node}, float(str(health["nodeCount"])))],
        )
        if self.store_stats:
            for key, value in sorted(self.store_stats.items()):
                if not isinstance(value, (int, float)):
                    continue
                total = key in ("transactions", "ops", "failures", "refused")
                metric(
                    f"store_{key}_total" if total else f"store_{key}",
                    "counter" if total else "gauge",
                    f"store writer: {key.replace('_', ' ')}",
                    [({"node": node}, float(value))],
                )
        metric(
            "retained_messages_node",
            "gauge",
            "retained messages held by the relay",
            [({"node": node}, float(len(self.state.retained)))],
        )
        links = stats["links"]
        assert isinstance(links, dict)
        if links:
            for key, help_text in (
                ("sent", "frames sent"),
                ("received", "frames received in order"),
                ("unacked", "frames not yet acknowledged"),
                ("rttMs", "heartbeat round trip, ms"),
                ("dropped", "frames never acknowledged (lost with a restarted stream or a death)"),
            ):
                name = {
                    "sent": "peer_frames_sent_total",
                    "received": "peer_frames_received_total",
                    "unacked": "peer_frames_unacked",
                    "rttMs": "peer_rtt_ms",
                    "dropped": "peer_frames_dropped_total",
                }[key]
                metric(
                    name,
                    "counter" if name.endswith("_total") else "gauge",
                    help_text,
                    [({"node": node, "peer": p}, float(v[key])) for p, v in links.items()],
                )
            metric(
                "peer_up",
                "gauge",
                "1 when the peer is ALIVE or SUSPECT",
                [
                    ({"node": node, "peer": p}, float(v["state"] in ("ALIVE", "SUSPECT")))
                    for p, v in links.items()
                ],
            )
        return "\n".join(lines) + "\n"

    def sys_messages(self) -> list[tuple[str, bytes]]:
        """This node's $SYS/meshmq/<node>/... topics and payloads (retained, every SysInterval)."""
        healthy, health = self.health()
        figures = self.stats()["node"]
        assert isinstance(figures, dict)
        base = f"$SYS/meshmq/{self.node}/"
        rows: list[tuple[str, object]] = [
            ("version", self.settings.version),
            ("uptime", int(time.time() - self.started_at)),
            ("health", json.dumps({"healthy": healthy, **health}, separators=(",", ":"))),
            ("clients/connected", figures.get("connections", 0)),
            ("sessions/online", figures.get("sessions_online", 0)),
            ("sessions/offline", figures.get("sessions_offline", 0)),
            ("subscriptions/count", figures.get("subscriptions", 0)),
            ("messages/received", figures.get("messages_received", 0)),
            ("messages/sent", figures.get("messages_sent", 0)),
            ("messages/queued", figures.get("queued_messages", 0)),
            ("bytes/received", figures.get("bytes_received", 0)),
            ("bytes/sent", figures.get("bytes_sent", 0)),
            ("retained/count", figures.get("retained_messages", 0)),
            ("cluster/members", json.dumps([m["name"] for m in self.members()])),
        ]
        return [(base + name, str(value).encode()) for name, value in rows]

    def ping(self, node: str, timeout_s: float) -> float | None:
        done, result = threading.Event(), []  # type: ignore[var-annotated]
        self.requests.put(("ping", node, done, result))
        if not done.wait(timeout_s) or not result:
            return None
        return float(result[0])

    def drain(self, node: str | None) -> bool:
        if node is None or node == self.node:
            os.kill(os.getppid(), signal.SIGTERM)  # the supervisor drains the node, as on SIGTERM
            return True
        done, result = threading.Event(), []  # type: ignore[var-annotated]
        self.requests.put(("drain", node, done, result))
        return done.wait(2.0) and bool(result)


_LIMIT_PREFIX = "limit_"

_GAUGES = frozenset(
    {
        "connections",
        "sessions_online",
        "sessions_offline",
        "queued_messages",
        "inflight_messages",
        "subscriptions",
        "retained_messages",
        "store_wait_ms",
    }
)


def _selector(topic_filter: str | None) -> Callable[[str], bool]:
    """A predicate over topics (or route filters as text): all, or those the MQTT filter matches."""
    if not topic_filter:
        return lambda _text: True
    table = RouteTable()
    table.add("q", topic_filter)
    return lambda text: text == topic_filter or bool(table.match(text))


def _answer(done: threading.Event, result: list[float]) -> Callable[[float], object]:
    def answered(rtt_ms: float) -> None:
        result.append(rtt_ms)
        done.set()

    return answered


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
