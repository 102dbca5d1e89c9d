"""The database port and its two real implementations: SQLite (WAL) and PostgreSQL.

SQL in killswitch is written once, with ``?`` placeholders, in ``service.storage.repository``;
this module only knows how to run it. PostgreSQL statements are rewritten to ``$n``
placeholders once per distinct statement (cached), never per call.

SQLite runs on the event-loop thread: a statement on a local WAL file with
``synchronous=NORMAL`` costs tens of microseconds, less than a hop to a worker thread.
A lock serialises transactions so two requests never interleave statements inside one.
Nothing here knows about tasks, agents or HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import asyncpg

Row = dict[str, Any]
log = logging.getLogger("killswitch.storage")


class Database(Protocol):
    dialect: str

    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement; returns the number of rows it changed."""
        ...

    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def fetchrow(self, sql: str, *args: Any) -> Row | None: ...

    def transaction(self) -> Any:
        """``async with db.transaction() as tx:`` — tx is a Database bound to one transaction."""
        ...

    async def close(self) -> None: ...


def _dict_row(cursor: sqlite3.Cursor, row: Sequence[Any]) -> Row:
    return {d[0]: v for d, v in zip(cursor.description, row, strict=True)}


class SqliteDatabase:
    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so autocommit outside.
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = _dict_row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute("PRAGMA busy_timeout=5000")
        # Checkpointing inside a request's COMMIT stalls the event loop for milliseconds;
        # a background thread with its own connection does it instead (see _checkpointer).
        self._conn.execute("PRAGMA wal_autocheckpoint=0")
        self._lock = asyncio.Lock()
        self._batch: asyncio.Future[None] | None = None
        self._stop = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="sqlite-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout=1000")
            while not self._stop.wait(1.0):
                # PASSIVE never blocks writers; what it cannot copy now it copies later.
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error:
            log.exception("WAL checkpoint thread stopped")
        finally:
            conn.close()

    # Group commit. A COMMIT costs more than the statements of a typical transaction, so
    # the transactions that finish within one turn of the event loop share one: each runs
    # inside a SAVEPOINT of an open batch (its own failure rolls back only itself), and
    # the batch commits on the next turn of the loop. (Holding it open a millisecond longer
    # measured no better: bench/issue.py.) Nobody is answered before the COMMIT
    # that holds its writes returned: every writer awaits the batch's future.

    def _join_batch(self) -> asyncio.Future[None]:
        if self._batch is None:
            self._conn.execute("BEGIN IMMEDIATE")
            self._batch = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(self._commit_batch)
        return self._batch

    def _commit_batch(self) -> None:
        batch, self._batch = self._batch, None
        if batch is None:
            return
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            batch.set_exception(exc)
            batch.exception()  # retrieved here too: nobody may be left awaiting it
        else:
            batch.set_result(None)

    async def execute(self, sql: str, *args: Any) -> int:
        async with self._lock:
            batch = self._join_batch()
            count = self._conn.execute(sql, args).rowcount
        await asyncio.shield(batch)
        return count

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with self._lock:
            return self._conn.execute(sql, args).fetchall()

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        async with self._lock:
            row: Row | None = self._conn.execute(sql, args).fetchone()
            return row

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_SqliteTx]:
        async with self._lock:
            batch = self._join_batch()
            self._conn.execute("SAVEPOINT tx")
            try:
                yield _SqliteTx(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK TO tx")
                self._conn.execute("RELEASE tx")
                raise
            self._conn.execute("RELEASE tx")
        await asyncio.shield(batch)

    async def close(self) -> None:
        async with self._lock:
            self._commit_batch()
        self._stop.set()
        self._checkpointer.join(timeout=5)
        self._conn.close()


class _SqliteTx:
    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        return self._conn.execute(sql, args).rowcount

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return self._conn.execute(sql, args).fetchall()

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        row: Row | None = self._conn.execute(sql, args).fetchone()
        return row

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_SqliteTx]:
        yield self  # already inside one

    async def close(self) -> None:
        return None


_PLACEHOLDER = re.compile(r"\?")


@lru_cache(maxsize=512)
def to_numbered(sql: str) -> str:
    """Rewrite ``?`` placeholders to PostgreSQL's ``$1, $2, ...``."""
    counter = iter(range(1, 10_000))
    return _PLACEHOLDER.sub(lambda _m: f"${next(counter)}", sql)


def _rowcount(status: str) -> int:
    # asyncpg returns the command tag, e.g. "UPDATE 3" or "INSERT 0 1".
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class PostgresDatabase:
    dialect = "postgresql"

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def connect(cls, url: str, *, min_size: int = 2, max_size: int = 10) -> PostgresDatabase:
        pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size)
        return cls(pool)

    async def execute(self, sql: str, *args: Any) -> int:
        return _rowcount(await self._pool.execute(to_numbered(sql), *args))

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return [dict(r) for r in await self._pool.fetch(to_numbered(sql), *args)]

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        row = await self._pool.fetchrow(to_numbered(sql), *args)
        return None if row is None else dict(row)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_PostgresTx]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield _PostgresTx(conn)

    async def close(self) -> None:
        await self._pool.close()


class _PostgresTx:
    dialect = "postgresql"

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        return _rowcount(await self._conn.execute(to_numbered(sql), *args))

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return [dict(r) for r in await self._conn.fetch(to_numbered(sql), *args)]

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        row = await self._conn.fetchrow(to_numbered(sql), *args)
        return None if row is None else dict(row)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_PostgresTx]:
        yield self

    async def close(self) -> None:
        return None


def is_unique_violation(exc: BaseException) -> bool:
    """True for a UNIQUE constraint failure on either database."""
    if isinstance(exc, asyncpg.UniqueViolationError):
        return True
    return isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in str(exc)


async def open_database(url: str) -> Database:
    """Open the database a ``KS_DATABASE_URL`` names."""
    if url.startswith("sqlite:///"):
        return SqliteDatabase(Path(url.removeprefix("sqlite:///")))
    if url.startswith(("postgresql://", "postgres://")):
        return await PostgresDatabase.connect(url)
    raise ValueError(f"unsupported database URL scheme: {url.split(':', 1)[0]}")
