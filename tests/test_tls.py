"""Sippet over TLS: the mints, the RPC and every socket of the daemon checked against one
context, here a test's own certificate authority, through token rotations (the fake Sippet
serving ``https://`` and ``wss://`` on loopback)."""

from __future__ import annotations

import ssl

import pytest
import trustme

from listener.testing import FakeSippet, running_daemon
from tests.test_calls_daemon import Seen


@pytest.fixture
def authority(monkeypatch: pytest.MonkeyPatch) -> trustme.CA:
    # Trust comes only from the context the daemon is given, not from the environment
    # (OpenSSL's default paths, which websockets' own contexts read, honour these).
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    return trustme.CA()


def contexts(authority: trustme.CA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    authority.configure_trust(client)
    return server, client


async def test_mints_rpc_and_every_socket_over_tls_use_the_context_the_daemon_is_given(
    authority: trustme.CA,
) -> None:
    server, client = contexts(authority)
    seen = Seen()
    async with (
        FakeSippet(tls=server, token_ttl=2.0) as fake,
        running_daemon(fake, [seen], sippet={"rotate_at": 0.5}, tls=client) as daemon,
    ):
        assert fake.base_url.startswith("https://")
        link = daemon.session.connection
        assert link is not None
        await fake.broadcast("incoming_call", {"callUuid": "c-1", "seq": 1})
        await seen.collected.wait_for(1)
        # A rotation (1 s into a 2 s token) opens a new socket, with the same context.
        await fake.wait_until(lambda: fake.joins >= 2)
        await fake.wait_until(lambda: daemon.session.connection is not link)
        await fake.broadcast("call_ended", {"callUuid": "c-1", "seq": 2})
        await seen.collected.wait_for(2)
        calls = await daemon.rpc.run("list_calls", fields=["id", "status"])
        assert calls == []
    assert seen.collected.payloads("seq") == [1, 2]
    assert fake.mints >= 2
    assert [request.body["action"] for request in fake.rpc_requests] == ["list_calls"]


async def test_a_server_the_context_does_not_trust_is_never_joined(
    authority: trustme.CA,
) -> None:
    server, _ = contexts(authority)
    # The system's trust store (and certifi's) knows nothing of the test's authority.
    untrusting = ssl.create_default_context()
    async with FakeSippet(tls=server) as fake:
        with pytest.raises(TimeoutError, match="did not join"):
            async with running_daemon(fake, [Seen()], tls=untrusting, join_timeout=1.0):
                pass
    assert fake.mints == 0
    assert fake.joins == 0
