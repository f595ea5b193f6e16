"""The configuration file, validated into one typed, frozen settings object.

TOML in, :class:`Settings` out. Every problem becomes a :class:`~listener.errors.ConfigError`
naming the dotted key and saying what is wrong in one line; unknown keys are errors with a
"did you mean" hint, because a typo that is silently ignored is a setting that silently
does not apply.

The secret key is never required in the file: it comes from ``$SIPPET_SECRET_KEY``, from the
file named by ``sippet.api_key_file``, or from the systemd credential ``sippet-secret-key``
(``LoadCredential=`` puts it in ``$CREDENTIALS_DIRECTORY``), in that order.
"""

from __future__ import annotations

import difflib
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from listener.errors import ConfigError

__all__ = [
    "CREDENTIAL_NAME",
    "DEFAULT_CONFIG_PATH",
    "ENV_SECRET_KEY",
    "ServiceSettings",
    "Settings",
    "SippetSettings",
    "format_validation_error",
    "load_settings",
    "parse_settings",
    "read_secret",
    "read_secret_file",
]

DEFAULT_CONFIG_PATH = Path("/etc/sippet-listener/config.toml")
ENV_SECRET_KEY = "SIPPET_SECRET_KEY"  # noqa: S105 - the variable's name, not its value
CREDENTIAL_NAME = "sippet-secret-key"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SippetSettings(_Section):
    """``[sippet]``: where Sippet is and how the realtime link behaves."""

    base_url: str = "https://api.sippet.ai"
    topic: str = "events"
    heartbeat_interval: float = Field(default=30.0, gt=0)
    api_key_file: Path | None = None
    join_timeout: float = Field(default=10.0, gt=0)
    connect_timeout: float = Field(default=10.0, gt=0)
    close_timeout: float = Field(default=5.0, gt=0)
    max_message_size: int = Field(default=64 * 1024 * 1024, ge=1024)
    rotate_at: float = Field(default=0.75, gt=0, lt=1)
    stable_after: float = Field(default=30.0, ge=0)
    backoff_initial: float = Field(default=0.5, gt=0)
    backoff_max: float = Field(default=30.0, gt=0)
    rotation_retry: float = Field(default=5.0, gt=0)
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
    log_format: Literal["auto", "json", "console"] = "auto"
    drain_timeout: float = Field(default=10.0, ge=0)
    metrics_listen: str = ""

    @field_validator("metrics_listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value and _split_host_port(value) is None:
            raise ValueError(f"{value!r} is not host:port, e.g. 127.0.0.1:9464")
        return value

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """``metrics_listen`` as (host, port), or None when metrics are off."""
        return _split_host_port(self.metrics_listen) if self.metrics_listen else None


def _split_host_port(value: str) -> tuple[str, int] | None:
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


class Settings(_Section):
    """The whole configuration file."""

    sippet: SippetSettings = Field(default_factory=SippetSettings)
    service: ServiceSettings = Field(default_factory=ServiceSettings)
    handlers: list[dict[str, Any]] = []


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


def format_validation_error(exc: ValidationError, model: type[BaseModel]) -> tuple[str, str]:
    """Turn pydantic's first error into ``(dotted key, one-line problem)``.

    List positions read as TOML users count them: ``handlers[1].rules[0].action``.
    """
    errors = exc.errors()
    # A misspelt key shows up twice: as unknown, and as its real name missing. The unknown
    # one, with its "did you mean", is the useful report.
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = list(error["loc"])
    key = _dotted(loc)
    if error["type"] == "extra_forbidden":
        known = _known_keys(model, loc[:-1])
        guess = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        return key, f"unknown key{hint}"
    message = error["msg"]
    if error["type"] == "value_error":
        message = message.removeprefix("Value error, ")
    return key, message[0].lower() + message[1:]


def _dotted(loc: list[int | str]) -> str:
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else str(part)
    return key


def _known_keys(model: type[BaseModel], loc: list[int | str]) -> list[str]:
    """The field names valid at ``loc`` inside ``model`` (looking through lists)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(part)
        current = _model_inside(field.annotation) if field is not None else None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _model_inside(annotation: Any) -> Any:
    """``Model`` for ``Model``, ``list[Model]``, ``Model | None`` and the like."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _model_inside(argument)
        if found is not None:
            return found
    return None


def read_secret(env: str, file: Path | None, credential: str, key: str) -> str:
    """Find a secret: environment variable, then ``*_file``, then a systemd credential.

    Args:
        env: the environment variable to look at first.
        file: the path configured by a ``*_file`` key, if any.
        credential: the credential name under ``$CREDENTIALS_DIRECTORY``.
        key: the config key to name in errors.

    Raises:
        ConfigError: no source holds the secret, or the named file cannot be read.
    """
    value = os.environ.get(env, "").strip()
    if value:
        return value
    if file is not None:
        return read_secret_file(file, key)
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials:
        path = Path(credentials) / credential
        if path.exists():
            return read_secret_file(path, key)
    raise ConfigError(
        key, f"no secret key: set ${env}, {key}, or the systemd credential {credential!r}"
    )


def read_secret_file(path: Path, key: str) -> str:
    """Read a secret from ``path``; a relative path is looked up in ``$CREDENTIALS_DIRECTORY``
    first, so ``LoadCredential=name:/etc/...`` pairs with ``..._file = "name"``.

    Raises:
        ConfigError: naming ``key``, if it cannot be read or is empty.
    """
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if not path.is_absolute() and credentials and (Path(credentials) / path).exists():
        path = Path(credentials) / path
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    if not value:
        raise ConfigError(key, f"{path} is empty")
    return value
