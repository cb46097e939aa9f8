"""Fixtures for cluster tests: clusters of real nodes (`cluster_factory`) and network labs (`lab_factory`).

Why: a cluster test starts several processes, a database and maybe network namespaces; each
must go away even when the test fails half-way. The fixtures own that: every cluster built by
`cluster_factory` is stopped (and its database dropped), every lab torn down, in teardown. On a
failure pytest shows what the fixtures print in teardown: the tail of each node's log.

Must not: leave a node, a namespace or the guard route behind; start a PostgreSQL server for a
test that does not need one (the server fixture is requested only when a cluster needs a URL).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.cluster import netns
from tests.cluster.netns import Lab
from tests.cluster.nodes import Cluster, NodeExtra
from tests.e2e.broker_proc import BROKER_KIND
from tests.pg import PgDatabase, PgServer, create_database, drop_database

ClusterFactory = Callable[..., Cluster]
LabFactory = Callable[..., Lab]


@pytest.fixture
def cluster_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ClusterFactory]:
    """`make(n=3, workers=1, mdns=False, curve=False, extra=None, *, pg_url=None, command=None,
    start=True) -> Cluster`: a cluster on a fresh database of the session's throwaway
    PostgreSQL (or on `pg_url`), started unless `start=False`; all stopped at teardown."""
    made: list[tuple[Cluster, PgDatabase | None]] = []

    def make(
        n: int = 3,
        workers: int = 1,
        mdns: bool = False,
        curve: bool = False,
        extra: NodeExtra | None = None,
        *,
        pg_url: str | None = None,
        command: Sequence[str] | None = None,
        start: bool = True,
    ) -> Cluster:
        if command is None and BROKER_KIND != "meshmq":
            pytest.skip(f"cluster tests need MeshMQ (MESHMQ_TEST_BROKER={BROKER_KIND})")
        db: PgDatabase | None = None
        if pg_url is None:
            server: PgServer = request.getfixturevalue("pg_server")
            db = create_database(server)
            pg_url = db.url
        try:
            cluster = Cluster(
                tmp_path / f"cluster{len(made) + 1}",
                pg_url,
                n=n,
                workers=workers,
                mdns=mdns,
                curve=curve,
                extra=extra,
                command=command,
            )
        except BaseException:
            if db is not None:
                drop_database(db)
            raise
        made.append((cluster, db))
        if start:
            cluster.start()
        return cluster

    try:
        yield make
    finally:
        errors: list[BaseException] = []
        for cluster, db in reversed(made):
            tails = cluster.log_tails()
            if tails:
                print(f"\n=== cluster {cluster.name} ===\n{tails}")  # shown by pytest on failure
            try:
                cluster.stop_all()
            except BaseException as e:  # stop the others all the same
                errors.append(e)
            if db is not None:
                try:
                    drop_database(db)
                except BaseException as e:
                    errors.append(e)
        if errors:
            raise errors[0]


@pytest.fixture
def lab_factory() -> Iterator[LabFactory]:
    """`make(n=3) -> Lab`: an up network lab (root only: skips where `ip netns add` fails;
    installs nftables if `nft` is missing); every lab torn down at teardown."""
    if not netns.available():
        pytest.skip("needs root and `ip netns add` (network-namespace lab)")
    netns.ensure_nft()
    labs: list[Lab] = []

    def make(n: int = 3) -> Lab:
        lab = Lab(netns.unique_prefix(), n)
        labs.append(lab)
        return lab.up()

    try:
        yield make
    finally:
        errors: list[BaseException] = []
        for lab in reversed(labs):
            try:
                lab.teardown()
            except BaseException as e:
                errors.append(e)
        if errors:
            raise errors[0]
