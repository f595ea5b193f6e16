"""``[store]``: where the shared store's URL comes from, and that its password never shows."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
import structlog

from listener.cluster.url import StoreUrl
from listener.core.errors import ConfigError
from listener.core.logs import configure_logging
from listener.service.config import Settings, parse_settings, store_url
from tests.postgres import PASSWORD, PostgresServer
from tests.test_cli import run_cli, write_config

SECRET = "s3cr3t-Pa55%40word"
URL = f"postgresql://sippet:{SECRET}@db.internal:5432/sippet?sslmode=require"


@pytest.fixture(autouse=True)
def no_ambient_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIPPET_STORE_URL", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


def test_no_url_anywhere_means_no_shared_store() -> None:
    assert store_url(Settings()) is None


def test_url_sources_in_order_env_then_file_then_credential_then_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "url").write_text("postgresql://from-file/db\n")
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "sippet-store-url").write_text("postgresql://from-credential/db")
    in_key = {"store": {"url": "postgresql://from-key/db"}}
    with_file = {"store": {"url": "postgresql://from-key/db", "url_file": str(tmp_path / "url")}}

    assert str(store_url(parse_settings(in_key))) == "postgresql://from-key/db"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    assert str(store_url(parse_settings(in_key))) == "postgresql://from-credential/db"
    assert str(store_url(parse_settings(with_file))) == "postgresql://from-file/db"
    monkeypatch.setenv("SIPPET_STORE_URL", "postgresql://from-env/db")
    assert str(store_url(parse_settings(with_file))) == "postgresql://from-env/db"


def test_the_password_is_redacted_in_str_repr_settings_and_errors() -> None:
    url = StoreUrl(URL)
    shown = "postgresql://sippet:[REDACTED]@db.internal:5432/sippet?sslmode=require"
    assert (str(url), repr(url)) == (shown, f"StoreUrl({shown!r})")
    assert url.conninfo == URL
    settings = parse_settings({"store": {"url": URL}})
    assert SECRET not in repr(settings)
    assert "s3cr3t-Pa55@word" not in repr(settings)
    # A password in the query string, and libpq quoting the bad part of a URL back.
    query = StoreUrl("postgresql://db/x?password=hunter2hunter2&sslmode=require")
    assert "hunter2" not in str(query)
    with pytest.raises(ConfigError) as raised:
        StoreUrl("postgresql://u:bad%zzsecret@db/x")
    assert raised.value.key == "store.url"
    assert "zzsecret" not in str(raised.value)
    assert "invalid percent-encoded token" in str(raised.value)


def test_a_url_that_is_not_postgresql_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_settings({"store": {"url": "mysql://root:toor-toor@db/x"}})
    assert raised.value.key == "store.url"
    assert "must start with postgresql://" in raised.value.problem
    assert "toor-toor" not in str(raised.value)


def test_a_lease_renewed_less_than_twice_per_ttl_is_refused() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_settings({"store": {"lease_ttl": 6, "lease_renew": 4}})
    assert raised.value.key == "store.lease_renew"


def test_the_password_never_reaches_a_log_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIPPET_STORE_URL", URL)
    url = store_url(Settings())
    assert url is not None
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    structlog.get_logger("test").info("connecting", url=url.conninfo, decoded="s3cr3t-Pa55@word")
    line = stream.getvalue()
    assert "[REDACTED]" in line
    assert SECRET not in line
    assert "s3cr3t-Pa55@word" not in line


async def test_check_config_connects_to_the_store(tmp_path: Path, postgres: PostgresServer) -> None:
    config = write_config(tmp_path / "c.toml", "[store]\nconnect_timeout = 2\n")
    env = {"SIPPET_SECRET_KEY": "sk_test_x1"}
    good, refused, unreachable = await asyncio.gather(
        run_cli("check-config", "-c", str(config), env={**env, "SIPPET_STORE_URL": postgres.url()}),
        run_cli(
            "check-config",
            "-c",
            str(config),
            env={**env, "SIPPET_STORE_URL": postgres.url().replace(PASSWORD, "wrong-password")},
        ),
        run_cli(
            "check-config",
            "-c",
            str(config),
            env={**env, "SIPPET_STORE_URL": f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/x"},
        ),
    )
    code, out, err = good
    assert code == 0, err
    assert out.startswith(f"{config}: ok (handlers: none; store: PostgreSQL 1")
    assert "postgres:[REDACTED]@127.0.0.1" in out
    # Refused credentials are the configuration's fault: 78, naming the key.
    code, out, err = refused
    assert code == 78
    assert "configuration error: store.url: " in err
    assert "password authentication failed" in err
    # Nobody answering is not: the configuration may be right (exit 1, still naming it).
    code, out, err = unreachable
    assert code == 1
    assert "store.url: " in err
    assert "Connection refused" in err
    for _, out, err in (good, refused, unreachable):
        assert PASSWORD not in out + err
        assert "wrong-password" not in out + err
        assert "Traceback" not in err


async def test_run_exits_78_on_a_store_that_refuses_the_url(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    config = write_config(
        tmp_path / "c.toml",
        f'[service]\nstate_dir = "{tmp_path}"\n[store]\nconnect_timeout = 1\n',
    )
    env = {"SIPPET_SECRET_KEY": "sk_test_x1", "SIPPET_STORE_URL": postgres.url("no_such_db")}
    code, out, err = await run_cli("run", "-c", str(config), env=env)
    # A restart cannot fix a database that does not exist: 78, which systemd does not restart.
    # (A store that does not answer is no reason to stop: see test_claims.)
    assert code == 78
    assert "store.url: postgresql://postgres:[REDACTED]@127.0.0.1" in err
    assert '"no_such_db" does not exist' in err
    assert PASSWORD not in out + err
