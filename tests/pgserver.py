"""A throwaway PostgreSQL cluster for the tests.

``PostgresServer`` runs ``initdb`` in a temporary directory, starts the server with
``pg_ctl`` on a free loopback port (TCP on 127.0.0.1 only, its unix socket inside the
temporary directory, durability switched off for speed) and creates the test database.
``stop()`` and ``start()`` take the server down and bring it back with the same data
directory and port, so tests can cut the database off mid-write.  ``cleanup()`` stops
it and removes the directory.

PostgreSQL refuses to run as root.  When the tests run as root (as CI does), the
cluster is owned and run by an unprivileged system user, ``dmarcmilter-test``, which
is created when missing.

The binaries come from the newest Debian installation under
``/usr/lib/postgresql/<version>/bin``, or else from ``PATH``.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
TEST_OS_USER = "dmarcmilter-test"
SUPERUSER = "postgres"
DATABASE = "dmarcmilter_test"
HOST = "127.0.0.1"
START_TIMEOUT = 60  # seconds, for pg_ctl -w
PORT_ATTEMPTS = 3

_TOOLS = ("initdb", "pg_ctl", "postgres")


class PostgresUnavailable(RuntimeError):
    """PostgreSQL is not installed, or the cluster could not be set up or started."""


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.name)) or (0,)


def find_bin_dir() -> Path:
    """The directory holding initdb, pg_ctl and postgres; Debian's newest first."""
    if DEBIAN_PG_ROOT.is_dir():
        candidates = sorted(DEBIAN_PG_ROOT.iterdir(), key=_version_key, reverse=True)
        for version_dir in candidates:
            bin_dir = version_dir / "bin"
            if all(os.access(bin_dir / tool, os.X_OK) for tool in _TOOLS):
                return bin_dir
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        # Resolve a symlink so that all three tools come from the same installation.
        for bin_dir in (Path(pg_ctl).resolve().parent, Path(pg_ctl).parent):
            if all(os.access(bin_dir / tool, os.X_OK) for tool in _TOOLS):
                return bin_dir
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found under "
        f"{DEBIAN_PG_ROOT}/<version>/bin or on PATH; install the Debian package "
        "'postgresql' (make test does this as root)"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _ensure_os_user(name: str) -> pwd.struct_passwd:
    """The unprivileged account that runs the server when the tests run as root."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    nologin = "/usr/sbin/nologin" if Path("/usr/sbin/nologin").exists() else "/bin/false"
    argv = [useradd, "--system", "--no-create-home", "--home-dir", "/nonexistent"]
    argv += ["--shell", nologin, "--user-group", name]
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode not in (0, 9):  # 9: the name appeared meanwhile
        raise PostgresUnavailable(f"could not create system user {name!r}: {result.stderr.strip()}")
    try:
        return pwd.getpwnam(name)
    except KeyError as exc:
        raise PostgresUnavailable(f"system user {name!r} missing after useradd") from exc


class PostgresServer:
    """One temporary PostgreSQL cluster; see the module docstring."""

    def __init__(self, bin_dir: Path | None = None) -> None:
        self.bin_dir = bin_dir if bin_dir is not None else find_bin_dir()
        self.os_user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self.os_user = _ensure_os_user(TEST_OS_USER)
        self.base_dir = Path(tempfile.mkdtemp(prefix="dmarcmilter-pg-"))
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir  # short path: unix socket names are length-limited
        self.log_file = self.base_dir / "postgres.log"
        self.port = 0
        self.running = False
        self.user = SUPERUSER
        self.database = DATABASE
        if self.os_user is not None:
            # mkdtemp makes the directory 0700; hand it to the server's account.
            os.chown(self.base_dir, self.os_user.pw_uid, self.os_user.pw_gid)

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the test database (psycopg 3 driver, no password)."""
        return f"postgresql+psycopg://{self.user}@{HOST}:{self.port}/{self.database}"

    # -- commands ---------------------------------------------------------------------

    def _command(self, argv: list[str]) -> list[str]:
        if self.os_user is None:
            return argv
        name = self.os_user.pw_name
        runuser = shutil.which("runuser")
        if runuser:
            return [runuser, "-u", name, "--", *argv]
        return ["su", "-s", "/bin/sh", name, "-c", shlex.join(argv)]

    def _run(self, tool: str, *args: str, timeout: float = START_TIMEOUT + 30) -> str:
        argv = self._command([str(self.bin_dir / tool), *args])
        env = {key: val for key, val in os.environ.items() if not key.startswith("PG")}
        env["LC_ALL"] = "C"
        try:
            result = subprocess.run(
                argv,
                cwd=self.base_dir,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresUnavailable(f"{tool} failed: {exc}") from exc
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise PostgresUnavailable(
                f"{tool} exited with {result.returncode}: {output}{self._log_tail()}"
            )
        return result.stdout

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        tail = "\n".join(text.splitlines()[-lines:])
        return f"\nserver log ({self.log_file}):\n{tail}" if tail else ""

    # -- life cycle ---------------------------------------------------------------

    def setup(self) -> PostgresServer:
        """initdb, first start on a free port, and CREATE DATABASE."""
        self._run(
            "initdb",
            "--pgdata",
            str(self.data_dir),
            "--username",
            SUPERUSER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--locale",
            "C",
            "--no-sync",
        )
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# dmarcmilter test cluster\n"
                f"listen_addresses = '{HOST}'\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                "fsync = off\n"
                "synchronous_commit = off\n"
                "full_page_writes = off\n"
                "max_connections = 50\n"
            )
        last_error: PostgresUnavailable | None = None
        for _ in range(PORT_ATTEMPTS):  # the free port may be taken before we bind it
            self.port = _free_port()
            try:
                self.start()
                break
            except PostgresUnavailable as exc:
                last_error = exc
        else:
            assert last_error is not None
            raise last_error
        self._create_database()
        return self

    def start(self) -> None:
        """Start the server (same data directory and port) and wait until it accepts."""
        if self.running:
            return
        self._run(
            "pg_ctl",
            "start",
            "--pgdata",
            str(self.data_dir),
            "--log",
            str(self.log_file),
            "--wait",
            "--timeout",
            str(START_TIMEOUT),
            "-o",
            f"-p {self.port}",
        )
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; mode is pg_ctl's: smart, fast (default) or immediate."""
        if not self.running:
            return
        self._run(
            "pg_ctl",
            "stop",
            "--pgdata",
            str(self.data_dir),
            "--mode",
            mode,
            "--wait",
            "--timeout",
            str(START_TIMEOUT),
        )
        self.running = False

    def cleanup(self) -> None:
        """Stop the server if it runs and remove the temporary directory."""
        try:
            if self.running:
                self.stop(mode="immediate")
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def _create_database(self) -> None:
        import psycopg

        try:
            with psycopg.connect(
                host=HOST, port=self.port, user=self.user, dbname="postgres", autocommit=True
            ) as conn:
                conn.execute(f'CREATE DATABASE "{self.database}"')
        except psycopg.Error as exc:
            raise PostgresUnavailable(
                f"could not create database {self.database}: {exc}{self._log_tail()}"
            ) from exc


def start_server() -> PostgresServer:
    """A running cluster with the test database; removed again if setting up fails."""
    server = PostgresServer()
    try:
        return server.setup()
    except BaseException:
        server.cleanup()
        raise
