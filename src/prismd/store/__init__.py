"""Everything durable: the Store interface (base.py) and its implementations."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Settings
    from .base import Store


def make_store(settings: Settings) -> Store:
    """PostgreSQL when `[store] url` (PRISMD_DATABASE_URL) is set, else the embedded SQLite
    database in the data directory."""
    if settings.store.url:
        from .postgres import PostgresStore

        if (settings.data_dir / "memory.db").is_file():
            logging.getLogger("prismd.store").warning(
                "%s holds memory notes that are not in PostgreSQL: move them with "
                "`prismd db import --from-sqlite %s`",
                settings.data_dir / "memory.db",
                settings.data_dir,
            )

        return PostgresStore(
            settings.store.url,
            pool_size=settings.store.pool_size,
            timeout_s=settings.store.timeout_s,
        )
    from .sqlite import SqliteStore

    return SqliteStore(settings.data_dir)
