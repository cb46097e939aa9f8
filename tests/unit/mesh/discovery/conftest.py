"""mDNS tests need zeroconf sockets on 127.0.0.1; skip them with the reason where that fails."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def mdns_on_loopback() -> None:
    from zeroconf import IPVersion, Zeroconf

    try:
        zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only, use_asyncio=False)
    except Exception as exc:
        pytest.skip(f"zeroconf cannot open mDNS sockets on 127.0.0.1 here: {exc!r}")
    zc.close()
