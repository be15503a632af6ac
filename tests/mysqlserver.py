"""A throwaway MariaDB (or MySQL) server for the tests.

``MySQLServer`` runs ``mariadb-install-db`` in a temporary directory, starts
``mariadbd`` on a free loopback port (TCP on 127.0.0.1 only, its unix socket
inside the temporary directory, durability switched off for speed, strict SQL
mode) and, with the first start's ``--init-file``, creates the test database
(utf8mb4, the server's default collation) and a TCP user with a password and
privileges on that database only, ``dmarc``@``127.0.0.1`` (and ``dmarc_admin``,
which may also change global settings).  The grant tables are real: the server
runs without ``--skip-grant-tables``, and root can log in only through the unix
socket, as the operating system's root.
``stop()`` and ``start()`` take the server down and bring it back with the same
data directory and port, so tests can cut the database off mid-write.
``cleanup()`` stops it and removes the directory.

mariadbd refuses to run as root.  When the tests run as root (as CI does), the
server is started with ``--user`` and switches to the unprivileged system user
that also runs the PostgreSQL test cluster (``dmarcmilter-test``, created when
missing), which owns the temporary directory.

The binaries come from ``/usr/sbin`` and ``/usr/bin`` (Debian's ``mariadb-server``
package), or else from ``PATH``; the older names (``mysqld``,
``mysql_install_db``) are tried after the current ones.  Only the server's own
option file in the temporary directory is read (``--defaults-file``), never
``/etc/mysql``.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO

from tests.pgserver import TEST_OS_USER, PostgresUnavailable, _ensure_os_user, _free_port

DATABASE = "dmarcmilter_test"
USER = "dmarc"
# For tests that change the server's global settings (SET GLOBAL); the
# application's user, above, has privileges on the test database only.
ADMIN_USER = "dmarc_admin"
HOST = "127.0.0.1"
START_TIMEOUT = 60  # seconds
STOP_TIMEOUT = 60
PORT_ATTEMPTS = 3
SEARCH_DIRS = (Path("/usr/sbin"), Path("/usr/bin"))

_SERVERS = ("mariadbd", "mysqld")
_INSTALLERS = ("mariadb-install-db", "mysql_install_db")


class MySQLUnavailable(RuntimeError):
    """MariaDB is not installed, or the server could not be set up or started."""


def _find(names: tuple[str, ...]) -> Path | None:
    for name in names:
        for directory in SEARCH_DIRS:
            if os.access(directory / name, os.X_OK):
                return directory / name
        found = shutil.which(name)
        if found:
            return Path(found)
    return None


def find_binaries() -> tuple[Path, Path]:
    """(the server, the data directory installer); MariaDB's names first."""
    server, installer = _find(_SERVERS), _find(_INSTALLERS)
    if server is None or installer is None:
        raise MySQLUnavailable(
            "MariaDB server binaries (mariadbd, mariadb-install-db) not found in "
            "/usr/sbin, /usr/bin or on PATH; install the Debian package 'mariadb-server' "
            "(make test does this as root)"
        )
    return server, installer


class MySQLServer:
    """One temporary MariaDB server; see the module docstring."""

    def __init__(self, server_bin: Path | None = None, installer: Path | None = None) -> None:
        if server_bin is None or installer is None:
            server_bin, installer = find_binaries()
        self.server_bin = server_bin
        self.installer = installer
        self.os_user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self.os_user = _ensure_os_user(TEST_OS_USER)
            except PostgresUnavailable as exc:
                raise MySQLUnavailable(str(exc)) from exc
        self.base_dir = Path(tempfile.mkdtemp(prefix="dmarcmilter-my-"))
        self.data_dir = self.base_dir / "data"
        self.socket = self.base_dir / "mysqld.sock"  # short: unix socket names are length-limited
        self.options_file = self.base_dir / "my.cnf"
        self.init_file = self.base_dir / "init.sql"
        self.log_file = self.base_dir / "mariadbd.log"
        self.port = 0
        self.user = USER
        self.password = secrets.token_hex(12)
        self.admin_password = secrets.token_hex(12)
        self.database = DATABASE
        self.process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None
        if self.os_user is not None:
            # mkdtemp makes the directory 0700; hand it to the server's account.
            os.chown(self.base_dir, self.os_user.pw_uid, self.os_user.pw_gid)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the test database (PyMySQL driver, over TCP)."""
        return (
            f"mysql+pymysql://{self.user}:{self.password}@{HOST}:{self.port}/"
            f"{self.database}?charset=utf8mb4"
        )

    @property
    def admin_url(self) -> str:
        """SQLAlchemy URL of the test database for a user that may also SET GLOBAL."""
        return (
            f"mysql+pymysql://{ADMIN_USER}:{self.admin_password}@{HOST}:{self.port}/"
            f"{self.database}?charset=utf8mb4"
        )

    # -- set-up -----------------------------------------------------------------------

    def _write_options(self) -> None:
        # [mysqld] is read by mariadbd and by mariadb-install-db's bootstrap.
        self.options_file.write_text(
            "# dmarcmilter test server\n"
            "[mysqld]\n"
            f"datadir = {self.data_dir}\n"
            f"socket = {self.socket}\n"
            f"pid-file = {self.base_dir / 'mariadbd.pid'}\n"
            f"log-error = {self.log_file}\n"
            f"port = {self.port}\n"
            f"bind-address = {HOST}\n"
            "skip-name-resolve\n"
            # The compiled-in default, spelled out: overlong values are refused,
            # not truncated, as on PostgreSQL.
            "sql-mode = STRICT_TRANS_TABLES,ERROR_FOR_DIVISION_BY_ZERO,"
            "NO_AUTO_CREATE_USER,NO_ENGINE_SUBSTITUTION\n"
            "character-set-server = utf8mb4\n"
            # Durability off: the data is thrown away after the run.
            "skip-log-bin\n"
            "sync-binlog = 0\n"
            "innodb-flush-log-at-trx-commit = 0\n"
            # loose-: ignored by a version that does not know the option.
            "loose-innodb-flush-method = nosync\n"
            "loose-innodb-doublewrite = 0\n"
            "innodb-buffer-pool-size = 64M\n"
            "loose-innodb-log-file-size = 32M\n"
            "max-connections = 100\n"
            "skip-external-locking\n"
            "loose-performance-schema = 0\n"
        )
        if self.os_user is not None:
            os.chown(self.options_file, self.os_user.pw_uid, self.os_user.pw_gid)

    def _write_init_file(self) -> None:
        # Like an administrator would: a utf8mb4 database with the server's
        # default collation (case-insensitive), and a TCP user with a password.
        self.init_file.write_text(
            f"CREATE DATABASE IF NOT EXISTS `{self.database}` CHARACTER SET utf8mb4;\n"
            f"CREATE USER IF NOT EXISTS '{self.user}'@'{HOST}' IDENTIFIED BY '{self.password}';\n"
            f"GRANT ALL PRIVILEGES ON `{self.database}`.* TO '{self.user}'@'{HOST}';\n"
            f"CREATE USER IF NOT EXISTS '{ADMIN_USER}'@'{HOST}' "
            f"IDENTIFIED BY '{self.admin_password}';\n"
            f"GRANT ALL PRIVILEGES ON *.* TO '{ADMIN_USER}'@'{HOST}';\n"
        )
        if self.os_user is not None:
            os.chown(self.init_file, self.os_user.pw_uid, self.os_user.pw_gid)

    def _user_args(self) -> list[str]:
        return [f"--user={self.os_user.pw_name}"] if self.os_user is not None else []

    def setup(self) -> MySQLServer:
        """Install the data directory, then start on a free port."""
        self._write_options()
        argv = [
            str(self.installer),
            f"--defaults-file={self.options_file}",
            *self._user_args(),
            "--auth-root-authentication-method=socket",
            "--skip-test-db",
        ]
        try:
            result = subprocess.run(
                argv,
                cwd=self.base_dir,
                env={**os.environ, "LC_ALL": "C"},
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT + 30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise MySQLUnavailable(f"{self.installer.name} failed: {exc}") from exc
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise MySQLUnavailable(
                f"{self.installer.name} exited with {result.returncode}: {output}{self._log_tail()}"
            )
        # mariadb-install-db's bootstrap runs without the grant tables, where
        # CREATE USER fails: the users are made by the first start instead.
        self._write_init_file()
        last_error: MySQLUnavailable | None = None
        for _ in range(PORT_ATTEMPTS):  # the free port may be taken before we bind it
            self.port = _free_port()
            self._write_options()
            try:
                self.start()
                break
            except MySQLUnavailable as exc:
                last_error = exc
        else:
            assert last_error is not None
            raise last_error
        self.init_file.unlink()  # it holds the passwords
        return self

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the server (same data directory and port) and wait until the
        test user can log in."""
        if self.running:
            return
        self._close_output()
        self._output = (self.base_dir / "mariadbd.out").open("ab")
        argv = [str(self.server_bin), f"--defaults-file={self.options_file}", *self._user_args()]
        if self.init_file.exists():
            argv.append(f"--init-file={self.init_file}")
        try:
            self.process = subprocess.Popen(
                argv,
                cwd=self.base_dir,
                env={**os.environ, "LC_ALL": "C"},
                stdin=subprocess.DEVNULL,
                stdout=self._output,
                stderr=subprocess.STDOUT,
            )
        except OSError as exc:
            raise MySQLUnavailable(f"cannot run {self.server_bin}: {exc}") from exc
        try:
            self._wait_ready()
        except MySQLUnavailable:
            self._kill()
            raise

    def _wait_ready(self) -> None:
        try:
            import pymysql
        except ImportError as exc:  # pragma: no cover - a test dependency
            raise MySQLUnavailable("PyMySQL is not installed: pip install -e '.[test]'") from exc
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise MySQLUnavailable(
                    f"{self.server_bin.name} exited with {self.process.returncode}"
                    f"{self._log_tail()}"
                )
            try:
                conn = pymysql.connect(
                    host=HOST,
                    port=self.port,
                    user=self.user,
                    password=self.password,
                    database=self.database,
                    connect_timeout=2,
                    # Something else listening on the port (it was taken
                    # after we chose it) might never send a greeting.
                    read_timeout=2,
                )
            except pymysql.Error as exc:
                last = str(exc)
                time.sleep(0.05)
                continue
            conn.close()
            return
        raise MySQLUnavailable(
            f"{self.server_bin.name} did not accept connections within {START_TIMEOUT} s "
            f"({last}){self._log_tail()}"
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: "fast" (default) is a clean shutdown (SIGTERM),
        "immediate" a crash (SIGKILL), as pg_ctl's modes of those names."""
        if not self.running:
            self._close_output()
            return
        if mode == "immediate":
            self._kill()
            return
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._kill()
            raise MySQLUnavailable(
                f"{self.server_bin.name} did not stop within {STOP_TIMEOUT} s"
            ) from None
        self._close_output()

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)
        self._close_output()

    def _close_output(self) -> None:
        if self._output is not None:
            self._output.close()
            self._output = None

    def cleanup(self) -> None:
        """Stop the server if it runs and remove the temporary directory."""
        try:
            self.stop(mode="immediate")
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def _log_tail(self, lines: int = 20) -> str:
        texts = []
        for path in (self.log_file, self.base_dir / "mariadbd.out"):
            try:
                texts.append(path.read_text(errors="replace"))
            except OSError:
                continue
        tail = "\n".join("\n".join(texts).splitlines()[-lines:])
        return f"\nserver log ({self.log_file}):\n{tail}" if tail else ""


def start_server() -> MySQLServer:
    """A running server with the test database; removed again if setting up fails."""
    server = MySQLServer()
    try:
        return server.setup()
    except BaseException:
        server.cleanup()
        raise
