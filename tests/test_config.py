"""Configuration: every problem names its key; secrets come from env, file or credentials."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from listener.core.errors import ConfigError
from listener.dispatch.loader import load_handlers
from listener.service.config import (
    CREDENTIAL_NAME,
    ENV_SECRET_KEY,
    load_settings,
    parse_settings,
    read_secret,
)

REPO = Path(__file__).resolve().parents[1]


def test_example_config_is_valid_and_every_commented_handler_loads() -> None:
    text = (REPO / "config.example.toml").read_text()
    settings = load_settings(REPO / "config.example.toml")
    assert settings.sippet.topic == "events"
    assert settings.sippet.heartbeat_interval == 30.0
    assert [item.settings.name for item in load_handlers(settings.handlers)] == ["log"]
    # Uncomment the optional handler tables: they must load as documented.
    uncommented = re.sub(r"(?m)^# (?=\[|[a-z_]+ = )", "", text)
    uncommented = re.sub(
        r'secret_file = "\w+\.whsec"',
        'secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"',
        uncommented,
    )
    every = parse_settings(tomllib.loads(uncommented))
    names = [item.settings.name for item in load_handlers(every.handlers)]
    assert names == ["log", "rpc", "crm", "fanout"]


def test_defaults() -> None:
    settings = parse_settings({})
    assert settings.sippet.base_url == "https://api.sippet.ai"
    assert settings.service.log_format == "auto"
    calls = settings.calls
    assert (calls.reconcile, calls.reconcile_interval, calls.id_window) == (True, 60.0, 2.0)
    assert calls.retain_ended >= calls.lookback_max
    assert calls.statuses.status_of("in_progress") == "answered"
    custom = parse_settings({"calls": {"ended_statuses": ["done"]}}).calls.statuses
    assert (custom.status_of("Done"), custom.status_of("completed")) == ("ended", None)


@pytest.mark.parametrize(
    ("data", "key", "problem"),
    [
        (
            {"sippet": {"heartbeat_intervall": 5}},
            "sippet.heartbeat_intervall",
            "unknown key; did you mean 'heartbeat_interval'?",
        ),
        ({"sipet": {}}, "sipet", "unknown key; did you mean 'sippet'?"),
        (
            {"sippet": {"heartbeat_interval": "soon"}},
            "sippet.heartbeat_interval",
            "input should be a valid number",
        ),
        (
            {"sippet": {"heartbeat_interval": 0}},
            "sippet.heartbeat_interval",
            "input should be greater than 0",
        ),
        ({"sippet": {"base_url": "api.sippet.ai"}}, "sippet.base_url", "must start with https://"),
        ({"service": {"log_level": "loud"}}, "service.log_level", "input should be"),
        (
            {"service": {"metrics_listen": "localhost"}},
            "service.metrics_listen",
            "'localhost' is not host:port or a port",
        ),
        (
            {"calls": {"reconcile_intervall": 5}},
            "calls.reconcile_intervall",
            "unknown key; did you mean 'reconcile_interval'?",
        ),
        ({"calls": {"reconcile": "sometimes"}}, "calls.reconcile", "input should be a valid"),
        ({"calls": {"id_window": 0}}, "calls.id_window", "input should be greater than 0"),
        (
            {"calls": {"lookback_max": 7200, "retain_ended": 3600}},
            "calls.retain_ended",
            "must be at least calls.lookback_max (7200 s)",
        ),
        (
            {"calls": {"ended_statuses": ["completed", "No Answer", "ringing"]}},
            "calls.ended_statuses",
            "status 'ringing' is both ringing and ended",
        ),
    ],
)
def test_errors_name_the_key(data: dict[str, object], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(data)
    assert caught.value.key == key
    assert caught.value.problem.startswith(problem)
    assert "\n" not in str(caught.value)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[sippet\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken)


def test_secret_sources_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk_from_file\n")
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / CREDENTIAL_NAME).write_text("sk_from_credential")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    monkeypatch.setenv(ENV_SECRET_KEY, "sk_from_env")
    args = (ENV_SECRET_KEY, key_file, CREDENTIAL_NAME, "sippet.api_key_file")
    assert read_secret(*args) == "sk_from_env"
    monkeypatch.delenv(ENV_SECRET_KEY)
    assert read_secret(*args) == "sk_from_file"
    assert read_secret(ENV_SECRET_KEY, None, CREDENTIAL_NAME, "k") == "sk_from_credential"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ConfigError, match="no secret key") as caught:
        read_secret(ENV_SECRET_KEY, None, CREDENTIAL_NAME, "sippet.api_key_file")
    assert caught.value.key == "sippet.api_key_file"
    with pytest.raises(ConfigError, match="cannot read"):
        read_secret(ENV_SECRET_KEY, tmp_path / "nope", CREDENTIAL_NAME, "sippet.api_key_file")


def test_state_dir_follows_systemd_state_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    assert str(parse_settings({}).service.state_dir) == "/var/lib/sippet-listener"
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/sippet-listener/acme")
    assert str(parse_settings({}).service.state_dir) == "/var/lib/sippet-listener/acme"
    explicit = parse_settings({"service": {"state_dir": "/srv/state"}})
    assert str(explicit.service.state_dir) == "/srv/state"


@pytest.mark.parametrize(
    ("written", "address"),
    [
        ("9464", ("127.0.0.1", 9464)),
        ("192.0.2.7:9464", ("192.0.2.7", 9464)),
        ("[::1]:80", ("::1", 80)),
    ],
)
def test_metrics_listen_without_a_host_binds_loopback(
    written: str, address: tuple[str, int]
) -> None:
    assert parse_settings({"service": {"metrics_listen": written}}).service.metrics_address == (
        address
    )
