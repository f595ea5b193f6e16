"""The test suite's own PostgreSQL: a real server, a fresh database per test."""

from __future__ import annotations

import psycopg
import pytest

from tests.postgres import PostgresServer


def test_each_test_gets_a_fresh_database_on_a_real_server(
    postgres: PostgresServer, pg_url: str
) -> None:
    with psycopg.connect(pg_url) as conn:
        (version,) = conn.execute("SHOW server_version_num").fetchone() or (0,)
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ).fetchone()
        conn.execute("CREATE TABLE mine (id int)")
    assert int(version) >= 140000
    assert tables == (0,)
    # Another database of the same server does not see this test's table.
    other = postgres.create_database("fixture_other")
    with psycopg.connect(other) as conn:
        assert conn.execute("SELECT to_regclass('mine')").fetchone() == (None,)


def test_a_halted_server_resumes_on_its_port_with_its_data(
    postgres: PostgresServer, pg_url: str
) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 42 AS answer")
    port = postgres.port
    postgres.halt()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(pg_url, connect_timeout=2)
    postgres.resume()
    assert postgres.port == port
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT answer FROM kept").fetchone() == (42,)


def test_a_server_a_test_left_halted_runs_again_for_the_next(
    postgres: PostgresServer, pg_url: str
) -> None:
    running = postgres.process.pid
    postgres.ensure_running()
    assert postgres.process.pid == running
    postgres.halt()
    # What pg_url does before each test.
    postgres.ensure_running()
    assert postgres.process.pid != running
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
