"""Fixtures for end-to-end tests: a real broker process per test (or per factory call)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.broker_proc import BROKER_KIND, BrokerProcess
from tests.e2e.clients import TestClient

BrokerFactory = Callable[..., BrokerProcess]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.e2e)
        if BROKER_KIND != "meshmq" and item.get_closest_marker("meshmq_only"):
            item.add_marker(pytest.mark.skip(reason="meshmq-specific (config or limits)"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "meshmq_only: needs MeshMQ's own config keys or behaviour")


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[BrokerFactory]:
    started: list[BrokerProcess] = []

    def make(config: dict[str, Any] | None = None, args: tuple[str, ...] = ()) -> BrokerProcess:
        workdir = tmp_path / f"b{len(started)}"
        workdir.mkdir()
        b = BrokerProcess(workdir=workdir, config=config or {}, args=args)
        started.append(b)
        return b.start()

    yield make
    for b in started:
        b.stop()


@pytest.fixture
def broker(broker_factory: BrokerFactory) -> BrokerProcess:
    return broker_factory()


@pytest.fixture
def clients() -> Iterator[list[TestClient]]:
    """Clients a test makes itself (TLS, WebSocket: options the factory does not take), closed at
    teardown."""
    made: list[TestClient] = []
    yield made
    for c in made:
        c.close()
