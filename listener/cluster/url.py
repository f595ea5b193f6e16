"""The store's URL, with its password kept out of sight.

``postgresql://user:password@host:port/db?...``: the password may sit in the user info or in
a ``password=`` query parameter. :class:`StoreUrl` shows either as ``[REDACTED]`` in its
``str`` and ``repr``, and :meth:`StoreUrl.scrub` does the same to any text (libpq quotes parts
of a URL it cannot parse in its messages: ``invalid percent-encoded token: "pa%zz"``).
"""

from __future__ import annotations

from typing import Final
from urllib.parse import SplitResult, parse_qsl, quote, unquote, urlsplit, urlunsplit

from listener.core.errors import ConfigError

__all__ = ["REDACTED", "StoreUrl"]

REDACTED: Final = "[REDACTED]"
_SCHEMES: Final = ("postgresql", "postgres")


class StoreUrl:
    """A validated ``postgresql://`` URL.

    Args:
        text: the URL.
        key: the config key it came from, named in errors.

    Raises:
        ConfigError: naming ``key``: not a postgresql:// URL, or one libpq cannot read.
    """

    __slots__ = ("_secrets", "_text", "key", "redacted")

    def __init__(self, text: str, key: str = "store.url") -> None:
        self.key = key
        self._text = text.strip()
        parts = urlsplit(self._text)
        self._secrets = _passwords(parts)
        self.redacted = _redacted(parts)
        if parts.scheme not in _SCHEMES:
            raise ConfigError(key, f"must start with postgresql:// (got {self.redacted!r})")
        # Here, not at the top: psycopg takes 0.12 s to import, which only a configured store
        # should pay (every command reads the configuration).
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        try:
            conninfo_to_dict(self._text)
        except psycopg.ProgrammingError as exc:
            raise ConfigError(key, f"not a valid URL: {self.scrub(str(exc)).strip()}") from None

    @property
    def conninfo(self) -> str:
        """The URL itself, password included: for the driver only, never for a message."""
        return self._text

    @property
    def secrets(self) -> tuple[str, ...]:
        """The password as written and as decoded (to register with the log redactor)."""
        return self._secrets

    def scrub(self, text: str) -> str:
        """``text`` with the password replaced, in every form it may appear in."""
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    def __str__(self) -> str:
        return self.redacted

    def __repr__(self) -> str:
        return f"StoreUrl({self.redacted!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoreUrl) and other._text == self._text

    def __hash__(self) -> int:
        return hash(self._text)


def _passwords(parts: SplitResult) -> tuple[str, ...]:
    found: list[str] = []
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        found.append(userinfo.split(":", 1)[1])
    found += [
        value
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
        if name == "password"
    ]
    raw = [pair.split("=", 1)[1] for pair in parts.query.split("&") if pair.startswith("password=")]
    forms = {form for secret in (*found, *raw) for form in (secret, unquote(secret), quote(secret))}
    # Longest first, so that a form containing another is replaced whole.
    return tuple(sorted((form for form in forms if form), key=len, reverse=True))


def _redacted(parts: SplitResult) -> str:
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:{REDACTED}@{host}"
    query = "&".join(
        f"password={REDACTED}" if pair.startswith("password=") else pair
        for pair in parts.query.split("&")
        if pair
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))
