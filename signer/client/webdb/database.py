"""The web application's database: SQLite (the demo) or MariaDB/MySQL (production), one
connection in one worker thread. What differs between the two lives in `DIALECTS`; the queries
themselves are common SQL (backquoted identifiers work in both)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

from signer.client.webdb.config import DatabaseConfig
from signer.config import check_secret_file

# A DB-API connection of the dialect's driver (sqlite3, or PyMySQL, which ships no types).
Connection = Any


def _connect_sqlite(config: DatabaseConfig) -> Connection:
    assert config.path is not None  # DatabaseConfig requires it for sqlite
    conn = sqlite3.connect(config.path, isolation_level=None, timeout=config.connect_timeout)
    conn.execute("PRAGMA journal_mode=WAL")
    return conn


def _connect_mysql(config: DatabaseConfig) -> Connection:
    import pymysql  # only the MariaDB host needs it loaded

    return pymysql.connect(
        host=config.host or "localhost",
        port=config.port,
        unix_socket=str(config.socket) if config.socket else None,
        user=config.user,
        password=_password(config.password_file),
        database=config.database,
        autocommit=True,
        charset="utf8mb4",
        connect_timeout=int(config.connect_timeout),
    )


def _password(path: Path | None) -> str:
    """The first line of the password file (mode 0600 checked); never logged."""
    if path is None:
        return ""
    check_secret_file(path)
    return path.read_text(encoding="utf-8").splitlines()[0] if path.stat().st_size else ""


@dataclass(frozen=True)
class Dialect:
    """Everything that differs between SQLite and MariaDB/MySQL, in one place."""

    placeholder: str
    connect: Callable[[DatabaseConfig], Connection]
    ping_before_use: bool  # a server restart or wait_timeout may have closed the connection

    def sql(self, text: str) -> str:
        """Queries are written with `?`; MySQL drivers want `%s`."""
        return text.replace("?", self.placeholder)


DIALECTS = {
    "sqlite": Dialect("?", _connect_sqlite, False),
    "mysql": Dialect("%s", _connect_mysql, True),
}


class Database:
    """One connection, used from one worker thread: the drivers block, the event loop must not."""

    def __init__(self, config: DatabaseConfig):
        self.config = config
        self.dialect = DIALECTS[config.driver]
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="webdb")
        self._conn: Connection | None = None

    async def query(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await self._run(self._query, sql, tuple(params))
        return rows

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> int:
        """Run one statement (autocommit); returns the number of rows it changed."""
        changed: int = await self._run(self._execute, sql, tuple(params))
        return changed

    async def close(self) -> None:
        await self._run(self._close)
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        cursor = self._cursor(sql, params)
        rows = cursor.fetchall()
        names = [d[0] for d in cursor.description or ()]
        return [dict(zip(names, row, strict=True)) for row in rows]

    def _execute(self, sql: str, params: tuple[Any, ...]) -> int:
        return int(self._cursor(sql, params).rowcount)

    def _cursor(self, sql: str, params: tuple[Any, ...]) -> Any:
        cursor = self._connection().cursor()
        cursor.execute(self.dialect.sql(sql), params)
        return cursor

    def _connection(self) -> Connection:
        if self._conn is not None and self.dialect.ping_before_use:
            try:
                self._conn.ping()
            except Exception:
                self._close()
        if self._conn is None:
            self._conn = self.dialect.connect(self.config)
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


def db_time(moment: datetime, zone: tzinfo | None = None) -> str:
    """A WebDB DATETIME: naive, in the database's local time (what NOW() gives)."""
    return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S")
