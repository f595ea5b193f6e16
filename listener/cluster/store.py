"""One instance's part of the shared store: its pool, its claims and its vote for a leader.

:meth:`SharedStore.open` connects and applies pending migrations (so a fresh database, or an
upgrade, needs no manual step; ``store migrate`` does the same by hand).
"""

from __future__ import annotations

from listener.cluster.claims import Claims
from listener.cluster.database import StoreError, describe, make_pool, open_pool
from listener.cluster.leader import Elector, LeaseSettings, holder_id
from listener.cluster.schema import Migrated, migrate
from listener.cluster.url import StoreUrl

__all__ = ["SharedStore"]


class SharedStore:
    """The store as one instance uses it.

    Args:
        url: the store's URL.
        pool_size: connections at most (claims; the elector has one of its own).
        connect_timeout: seconds to connect, and for a claim.
        lease: the leader lease's timing.
        holder: this instance's name in the store (:func:`holder_id` by default).
    """

    def __init__(
        self,
        url: StoreUrl,
        *,
        pool_size: int = 4,
        connect_timeout: float = 5.0,
        lease: LeaseSettings | None = None,
        holder: str | None = None,
    ) -> None:
        self.url = url
        self.holder = holder or holder_id()
        self.connect_timeout = connect_timeout
        self.pool = make_pool(url, size=pool_size, connect_timeout=connect_timeout)
        self.claims = Claims(self.pool, url, self.holder, timeout=connect_timeout)
        self.elector = Elector(url, lease, holder=self.holder)

    async def open(self) -> Migrated:
        """Connect and migrate.

        Raises:
            StoreError: the store cannot be reached, refused us, or has a newer schema.
        """
        await open_pool(self.pool, self.url, self.connect_timeout)
        try:
            async with self.pool.connection() as conn:
                return await migrate(conn, self.url)
        except StoreError:
            await self.pool.close()
            raise
        except Exception as exc:
            await self.pool.close()
            raise describe(self.url, exc) from None

    async def close(self) -> None:
        """Close the pool."""
        await self.pool.close()
