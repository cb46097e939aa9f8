"""The mesh's high-water marks: QoS 1 across workers is held back, never dropped.

PROTOCOL.md: every worker XPUB has XPUB_NODROP and a send high-water mark; an envelope with QoS 1/2
items that meets the mark waits in the worker's outbox while the worker stops reading its MQTT
clients. With marks of a single envelope every burst meets them, so this test walks that path
on every few messages and checks that nothing is lost and order is kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.clients import ClientFactory, Message
from tests.e2e.workers_helpers import WorkerNode, numbered, seqs, start_worker_node, take_until

pytestmark = pytest.mark.meshmq_only


@pytest.fixture
def tiny_marks(tmp_path: Path) -> Iterator[WorkerNode]:
    # (a queue large enough that MaxQueuedMessages never drops: the mesh is what is tested)
    config = {"Mesh": {"SendHwm": 1, "RecvHwm": 1}, "MQTT": {"MaxQueuedMessages": 100_000}}
    node = start_worker_node(tmp_path, 2, config)
    try:
        yield node
    finally:
        node.broker.stop()


def test_qos1_across_workers_at_the_high_water_mark_loses_nothing(tiny_marks: WorkerNode) -> None:
    n = 3000
    with ClientFactory(tiny_marks.shared) as make:
        sub = make("hwm-sub", broker=tiny_marks.worker(2))
        assert sub.subscribe("hwm/t", 1) == [1]
        pub = make("hwm-pub", broker=tiny_marks.worker(1))
        pub.publish_many("hwm/t", numbered(n), qos=1, timeout_s=30)
        got: list[Message] = []
        take_until(sub, got, n, timeout_s=30)
        assert seqs(got) == list(range(n))  # all of them, in order [MQTT-4.6.0-5]
    assert "mesh high-water mark reached" in tiny_marks.log()
