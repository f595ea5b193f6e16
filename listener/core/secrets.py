"""Where secrets come from: an environment variable, a ``*_file`` key, a systemd credential."""

from __future__ import annotations

import os
from pathlib import Path

from listener.core.errors import ConfigError

__all__ = ["read_optional_secret", "read_secret", "read_secret_file"]


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
        if _present(path, key):
            return read_secret_file(path, key)
    raise ConfigError(
        key, f"no secret key: set ${env}, {key}, or the systemd credential {credential!r}"
    )


def read_optional_secret(env: str, file: Path | None, credential: str, key: str) -> str | None:
    """:func:`read_secret` when any of its sources is set (the variable, the ``*_file`` key,
    the credential), else None: the secret is optional.

    Raises:
        ConfigError: a source is set but cannot be read.
    """
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if (
        os.environ.get(env, "").strip()
        or file is not None
        or (credentials and _present(Path(credentials) / credential, key))
    ):
        return read_secret(env, file, credential, key)
    return None


def read_secret_file(path: Path, key: str) -> str:
    """Read a secret from ``path``; a relative path is looked up in ``$CREDENTIALS_DIRECTORY``
    first, so ``LoadCredential=name:/etc/...`` pairs with ``..._file = "name"``.

    Raises:
        ConfigError: naming ``key``, if it cannot be read or is empty.
    """
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if not path.is_absolute() and credentials and _present(Path(credentials) / path, key):
        path = Path(credentials) / path
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    if not value:
        raise ConfigError(key, f"{path} is empty")
    return value


def _present(path: Path, key: str) -> bool:
    """Whether ``path`` exists; a directory we may not even look into is an error, not "no".

    systemd 252 hides ``/run/credentials`` from ``ExecReload=`` (issue #35227): that must
    read as one line naming the place, not as a traceback.
    """
    try:
        return path.exists()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
