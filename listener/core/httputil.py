"""Who we say we are to every server: the package version and the User-Agent."""

from __future__ import annotations

from importlib import metadata

__all__ = ["USER_AGENT", "VERSION"]


def _version() -> str:
    try:
        return metadata.version("sippet-listener")
    except metadata.PackageNotFoundError:
        return "0+unknown"


VERSION = _version()
USER_AGENT = f"sippet-listener/{VERSION}"
