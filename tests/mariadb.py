"""A private MariaDB server for the tests: Debian's mariadb-server, started as a subprocess with
its own data directory and socket (no TCP), and ended by its PID. Not a mock: the WebDB client
talks to it exactly as it talks to the web application's database, which ran with a non-strict
`sql_mode` (MySQL 5's NO_ENGINE_SUBSTITUTION: the PHP's INSERTs leave NOT NULL columns out and
write '' into numbers, which strict mode refuses)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pymysql

STARTUP_TIMEOUT = 60.0
SQL_MODE = "NO_ENGINE_SUBSTITUTION"  # production's: not strict


@dataclass
class MariaDB:
    """A running server: connect through `socket` as root (no password)."""

    socket: Path
    directory: Path
    process: subprocess.Popen[bytes]

    def create_database(self, name: str) -> None:
        with self.connect() as conn, conn.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
            cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")

    def connect(self, database: str | None = None) -> pymysql.Connection:
        return pymysql.connect(
            unix_socket=str(self.socket), user="root", database=database, autocommit=True
        )

    def stop(self) -> None:
        """SIGTERM by PID (a clean InnoDB shutdown), SIGKILL if it does not end in time."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def _binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        raise RuntimeError(f"{name} not found: install Debian's mariadb-server (ops/setup.sh)")
    return found


def start_mariadb(directory: Path) -> MariaDB:
    """Initialise a data directory in `directory` and start a server on a private socket."""
    data, socket, log = directory / "data", directory / "mysqld.sock", directory / "error.log"
    subprocess.run(
        [
            _binary("mariadb-install-db"),
            "--auth-root-authentication-method=normal",
            f"--datadir={data}",
            "--user=root",
            "--skip-test-db",
        ],
        check=True,
        capture_output=True,
    )
    process = subprocess.Popen(
        [
            _binary("mariadbd"),
            "--no-defaults",
            f"--datadir={data}",
            f"--socket={socket}",
            f"--pid-file={directory / 'mysqld.pid'}",
            f"--log-error={log}",
            "--skip-networking",
            "--user=root",
            "--skip-log-bin",
            "--innodb-buffer-pool-size=32M",
            "--innodb-flush-log-at-trx-commit=2",
            f"--sql-mode={SQL_MODE}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = MariaDB(socket, directory, process)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"mariadbd exited at start: {log.read_text()[-2000:]}")
        try:
            server.connect().close()
            return server
        except pymysql.err.OperationalError:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError("mariadbd did not accept connections in time") from None
            time.sleep(0.1)
