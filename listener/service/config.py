"""The configuration file, validated into one typed, frozen settings object.

TOML in, :class:`Settings` out. Every problem becomes a :class:`~listener.ConfigError`
naming the dotted key and saying what is wrong in one line; unknown keys are errors with a
"did you mean" hint, because a typo that is silently ignored is a setting that silently
does not apply.

The secret key is never required in the file: it comes from ``$SIPPET_SECRET_KEY``, from the
file named by ``sippet.api_key_file``, or from the systemd credential ``sippet-secret-key``
(``LoadCredential=`` puts it in ``$CREDENTIALS_DIRECTORY``), in that order.

The status page's admin token (``service.admin_token``) is optional and found the same way:
``$SIPPET_ADMIN_TOKEN``, ``service.admin_token_file``, the credential ``sippet-admin-token``,
or ``service.admin_token`` itself; without one the page is read-only.

The shared store's URL (``[store]``, password included) comes the same way: from
``$SIPPET_STORE_URL``, the file named by ``store.url_file``, the credential
``sippet-store-url``, then ``store.url`` itself; see :func:`store_url`.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from listener.calls.reconciler import ReconcileSettings
from listener.calls.state import StatusMap
from listener.cluster.url import StoreUrl
from listener.core.errors import ConfigError
from listener.core.logs import register_secret
from listener.core.retry import BackoffPolicy
from listener.core.secrets import read_optional_secret, read_secret, read_secret_file
from listener.core.validation import format_validation_error
from listener.realtime.connection import LinkSettings
from listener.realtime.session import SessionSettings

__all__ = [
    "ADMIN_CREDENTIAL_NAME",
    "CREDENTIAL_NAME",
    "DEFAULT_CONFIG_PATH",
    "ENV_ADMIN_TOKEN",
    "ENV_SECRET_KEY",
    "ENV_STORE_URL",
    "STORE_CREDENTIAL_NAME",
    "CallsSettings",
    "ServiceSettings",
    "Settings",
    "SippetSettings",
    "StoreSettings",
    "format_validation_error",
    "load_settings",
    "parse_settings",
    "read_admin_token",
    "read_secret",
    "read_secret_file",
    "store_url",
]

DEFAULT_CONFIG_PATH = Path("/etc/sippet-listener/config.toml")
ENV_SECRET_KEY = "SIPPET_SECRET_KEY"  # noqa: S105 - the variable's name, not its value
CREDENTIAL_NAME = "sippet-secret-key"
ENV_STORE_URL = "SIPPET_STORE_URL"
STORE_CREDENTIAL_NAME = "sippet-store-url"
ENV_ADMIN_TOKEN = "SIPPET_ADMIN_TOKEN"  # noqa: S105 - the variable's name, not its value
ADMIN_CREDENTIAL_NAME = "sippet-admin-token"
# An admin token anyone could guess in a few tries protects nothing.
_MIN_ADMIN_TOKEN = 16


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _default(settings: type[Any], name: str) -> Any:
    """The default of field ``name`` of a settings dataclass: each is written there, once."""
    return next(item.default for item in dataclasses.fields(settings) if item.name == name)


class SippetSettings(_Section):
    """``[sippet]``: where Sippet is and how the realtime link behaves.

    The link and session defaults are those of :class:`LinkSettings`, :class:`SessionSettings`
    and :class:`BackoffPolicy`; :func:`listener.service.daemon.session_settings` maps back.
    """

    base_url: str = "https://api.sippet.ai"
    topic: str = _default(LinkSettings, "topic")
    heartbeat_interval: float = Field(default=_default(LinkSettings, "heartbeat_interval"), gt=0)
    api_key_file: Path | None = None
    join_timeout: float = Field(default=_default(LinkSettings, "join_timeout"), gt=0)
    connect_timeout: float = Field(default=_default(LinkSettings, "connect_timeout"), gt=0)
    close_timeout: float = Field(default=_default(LinkSettings, "close_timeout"), gt=0)
    max_message_size: int = Field(default=_default(LinkSettings, "max_message_size"), ge=1024)
    rotate_at: float = Field(default=_default(SessionSettings, "rotate_at"), gt=0, lt=1)
    stable_after: float = Field(default=_default(SessionSettings, "stable_after"), ge=0)
    backoff_initial: float = Field(default=_default(BackoffPolicy, "initial"), gt=0)
    backoff_max: float = Field(default=_default(BackoffPolicy, "cap"), gt=0)
    rotation_retry: float = Field(default=_default(SessionSettings, "rotation_retry"), gt=0)
    # Tries per `mint-token` run; the daemon retries mints in its session loop instead.
    mint_attempts: int = Field(default=5, ge=1)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with https:// (or http:// for a local server)")
        return value.rstrip("/")


class ServiceSettings(_Section):
    """``[service]``: how the process runs."""

    # systemd's StateDirectory= says where in $STATE_DIRECTORY (one per template instance).
    state_dir: Path = Field(
        default_factory=lambda: Path(
            os.environ.get("STATE_DIRECTORY", "").split(":")[0] or "/var/lib/sippet-listener"
        )
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # "console" is the older spelling of "pretty".
    log_format: Literal["auto", "json", "pretty", "console"] = "auto"
    drain_timeout: float = Field(default=10.0, ge=0)
    metrics_listen: str = ""
    # The status page's actions (replay, pause, enable); redacted in any repr or dump.
    admin_token: SecretStr | None = None
    admin_token_file: Path | None = None

    @field_validator("admin_token_file")
    @classmethod
    def _one_token_source(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and info.data.get("admin_token") is not None:
            raise ValueError("admin_token and admin_token_file are both given: keep one")
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value and _split_host_port(value) is None:
            raise ValueError(f"{value!r} is not host:port or a port, e.g. 127.0.0.1:9464")
        return value

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """``metrics_listen`` as (host, port), or None when metrics are off."""
        return _split_host_port(self.metrics_listen) if self.metrics_listen else None


def _statuses(status: str) -> list[str]:
    """The default spellings of one status in the status map, sorted."""
    words: frozenset[str] = getattr(StatusMap(), status)
    return sorted(words)


class CallsSettings(_Section):
    """``[calls]``: the call map, stable event ids and reconciliation with ``list_calls``.

    The reconciliation defaults are :class:`ReconcileSettings`'s, the status spellings
    :class:`StatusMap`'s.
    """

    reconcile: bool = _default(ReconcileSettings, "enabled")
    reconcile_interval: float = Field(default=_default(ReconcileSettings, "interval"), gt=0)
    lookback_max: float = Field(default=_default(ReconcileSettings, "lookback_max"), gt=0)
    retain_ended: float = Field(default=86400.0, gt=0)
    ringing_statuses: list[str] = Field(default_factory=lambda: _statuses("ringing"))
    answered_statuses: list[str] = Field(default_factory=lambda: _statuses("answered"))
    ended_statuses: list[str] = Field(default_factory=lambda: _statuses("ended"))
    id_window: float = Field(default=2.0, gt=0)

    @field_validator("retain_ended")
    @classmethod
    def _keeps_what_a_pass_may_ask(cls, value: float, info: ValidationInfo) -> float:
        lookback = info.data.get("lookback_max")
        if lookback is not None and value < lookback:
            # A call forgotten while a pass may still return it would be rebuilt again.
            raise ValueError(f"must be at least calls.lookback_max ({lookback:g} s)")
        return value

    @field_validator("ended_statuses")
    @classmethod
    def _one_meaning_each(cls, value: list[str], info: ValidationInfo) -> list[str]:
        ringing, answered = info.data.get("ringing_statuses"), info.data.get("answered_statuses")
        if ringing is not None and answered is not None:
            StatusMap(frozenset(ringing), frozenset(answered), frozenset(value))
        return value

    @property
    def statuses(self) -> StatusMap:
        """The status mapping the lists make."""
        return StatusMap(
            frozenset(self.ringing_statuses),
            frozenset(self.answered_statuses),
            frozenset(self.ended_statuses),
        )


def _split_host_port(value: str) -> tuple[str, int] | None:
    # A port alone binds loopback: the status page's actions and /metrics stay off the
    # network unless a host is written.
    if value.isdigit():
        value = f"127.0.0.1:{value}"
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


class StoreSettings(_Section):
    """``[store]``: the PostgreSQL store several instances share.

    Without a URL from any source (:func:`store_url`) there is none: each instance keeps its
    state in SQLite under ``service.state_dir``, as before.
    """

    # Kept out of repr: a password may be written here (better: in url_file or a credential).
    url: str = Field(default="", repr=False)
    url_file: Path | None = None
    pool_size: int = Field(default=4, ge=1)
    connect_timeout: float = Field(default=5.0, gt=0)
    # The leader's lease (singleton work): held for lease_ttl, renewed every lease_renew.
    lease_ttl: float = Field(default=15.0, gt=0)
    lease_renew: float = Field(default=5.0, gt=0)

    @field_validator("url")
    @classmethod
    def _postgresql_url(cls, value: str) -> str:
        if value:
            try:
                StoreUrl(value)
            except ConfigError as exc:
                raise ValueError(exc.problem) from None
        return value

    @field_validator("lease_renew")
    @classmethod
    def _renewed_in_time(cls, value: float, info: ValidationInfo) -> float:
        ttl = info.data.get("lease_ttl")
        if ttl is not None and value * 2 > ttl:
            # Two renewals per lease: one lost to a slow round trip still leaves the other.
            raise ValueError(f"must be at most half of store.lease_ttl ({ttl:g} s)")
        return value


class Settings(_Section):
    """The whole configuration file."""

    sippet: SippetSettings = Field(default_factory=SippetSettings)
    service: ServiceSettings = Field(default_factory=ServiceSettings)
    calls: CallsSettings = Field(default_factory=CallsSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    handlers: list[dict[str, Any]] = []


def store_url(settings: Settings) -> StoreUrl | None:
    """The shared store's URL, or None when there is none (SQLite under state_dir).

    From ``$SIPPET_STORE_URL``, then the file ``store.url_file``, then the systemd credential
    ``sippet-store-url``, then ``store.url``. Its password is registered with the log
    redactor before anything can print it.

    Raises:
        ConfigError: naming ``store.url`` (or ``store.url_file``): unreadable or invalid.
    """
    store = settings.store
    text = read_optional_secret(
        ENV_STORE_URL, store.url_file, STORE_CREDENTIAL_NAME, "store.url_file"
    )
    if text is None:
        text = store.url or None
    if text is None:
        return None
    url = StoreUrl(text, "store.url")
    for secret in url.secrets:
        register_secret(secret)
    return url


def read_admin_token(service: ServiceSettings) -> str | None:
    """The status page's admin token, or None when none is configured (read-only page).

    Looked for in ``$SIPPET_ADMIN_TOKEN``, ``service.admin_token_file``, the systemd
    credential ``sippet-admin-token``, then ``service.admin_token``.

    Raises:
        ConfigError: a configured source cannot be read, or the token is too short.
    """
    key = "service.admin_token_file" if service.admin_token_file else "service.admin_token"
    token = read_optional_secret(
        ENV_ADMIN_TOKEN, service.admin_token_file, ADMIN_CREDENTIAL_NAME, key
    )
    if token is None and service.admin_token is not None:
        token = service.admin_token.get_secret_value().strip()
    if token is None:
        return None
    if len(token) < _MIN_ADMIN_TOKEN:
        # Never echo the token, not even its first characters.
        raise ConfigError(key, f"the admin token must be at least {_MIN_ADMIN_TOKEN} characters")
    return token


def parse_settings(data: Mapping[str, Any]) -> Settings:
    """Validate already-parsed TOML.

    Raises:
        ConfigError: naming the first invalid key.
    """
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        key, problem = format_validation_error(exc, Settings)
        raise ConfigError(key, problem) from None


def load_settings(path: Path) -> Settings:
    """Read and validate a TOML file.

    Raises:
        ConfigError: the file is missing, unreadable, not TOML, or invalid.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("", f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError("", f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{path}: not valid TOML: {exc}") from None
    return parse_settings(data)
