"""Run ``dmarcmilter run`` as a real process for tests and benchmarks.

:class:`MilterDaemon` writes a TOML configuration (its DNS pointed at the
loopback test DNS server, its state and socket in a temporary directory),
starts the daemon, waits until it listens, and stops it with a signal.  Its
standard error is kept, so tests can read the log lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0


def toml(config: dict[str, Any]) -> str:
    """A TOML document for a two-level dict of plain values (what the daemon
    configuration needs; the tests must not depend on a TOML writer)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} as TOML")

    top = [f"{k} = {value(v)}" for k, v in config.items() if not isinstance(v, dict)]
    sections = [
        f"[{name}]\n" + "\n".join(f"{k} = {value(v)}" for k, v in table.items())
        for name, table in config.items()
        if isinstance(table, dict)
    ]
    return "\n".join(top) + "\n\n" + "\n\n".join(sections) + "\n"


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, val in changes.items():
        if isinstance(val, dict):
            out.setdefault(key, {}).update(val)
        else:
            out[key] = val
    return out


class MilterDaemon:
    """One ``dmarcmilter run`` process."""

    def __init__(
        self,
        directory: Path,
        dns_port: int,
        config: dict[str, Any] | None = None,
        source: Path = ROOT,
    ):
        self.directory = directory
        # The source tree the daemon runs from (a benchmark may compare two).
        self.source = source
        self.socket = str(directory / "milter.sock")
        self.config_path = directory / "dmarcmilter.toml"
        self.log_path = directory / "dmarcmilter.log"
        self.state_dir = directory / "state"
        self.base = {
            "authserv_id": "mx.receiver.example",
            "dns": {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": 0.5, "budget": 4.0},
            "milter": {"socket": f"unix:{self.socket}"},
            "paths": {"state_dir": str(self.state_dir)},
        }
        self.write_config(config or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.state_dir / 'history.sqlite3'}"

    def write_config(self, changes: dict[str, Any]) -> None:
        self.config_path.write_text(toml(merge(self.base, changes)))

    def command(self) -> list[str]:
        return [sys.executable, "-m", "dmarcmilter", "run", "--config", str(self.config_path)]

    def start(self, *, wait: bool = True) -> MilterDaemon:
        env = {**os.environ, "PYTHONPATH": str(self.source)}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command(), cwd=self.directory, env=env, stdout=self._log, stderr=self._log
        )
        if wait:
            self.wait_listening()
        return self

    def wait_listening(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"dmarcmilter exited with {self.proc.returncode}: {self.log_text()}"
                )
            if "listening on" in self.log_text():
                return
            time.sleep(0.02)
        raise RuntimeError(f"dmarcmilter did not start in {timeout} s: {self.log_text()}")

    def reload(self, changes: dict[str, Any]) -> None:
        """Write the configuration (the base plus ``changes``) and reload it
        with SIGHUP; return once the log says it was reloaded."""
        reloaded = "configuration reloaded from " + str(self.config_path)
        before = len(self.log_lines(reloaded))
        self.write_config(changes)
        self.signal(signal.SIGHUP)
        lines = self.wait_log(reloaded, before + 1)
        assert len(lines) == before + 1, self.log_text()[-2000:]

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._log.close()
        return code

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self, msg: str | None = None) -> list[dict[str, str]]:
        """The logfmt lines, parsed; only those with ``msg`` when given."""
        lines = [parse_logfmt(line) for line in self.log_text().splitlines() if line.strip()]
        return [f for f in lines if msg is None or f.get("msg") == msg]

    def wait_log(self, msg: str, count: int = 1, timeout: float = 10.0) -> list[dict[str, str]]:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.log_lines(msg)
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.02)

    def __repr__(self) -> str:
        return f"MilterDaemon({shlex.join(self.command())})"


_PAIR = re.compile(r'([A-Za-z0-9_.]+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_logfmt(line: str) -> dict[str, str]:
    fields = {}
    for key, raw in _PAIR.findall(line):
        fields[key] = json.loads(raw) if raw.startswith('"') else raw
    return fields


# Starts one more daemon, with the base configuration plus these changes.
StartDaemon = Callable[..., MilterDaemon]


@contextlib.contextmanager
def daemons(
    directory: Path, dns_port: int, base: dict[str, Any] | None = None
) -> Iterator[StartDaemon]:
    """A way for a test to start daemons, each in a numbered directory under
    ``directory`` with ``base`` merged with that daemon's changes; every one
    started is stopped at the end."""
    started: list[MilterDaemon] = []

    def start(config: dict[str, Any] | None = None) -> MilterDaemon:
        home = directory / f"d{len(started)}"
        home.mkdir()
        daemon = MilterDaemon(home, dns_port, merge(base or {}, config or {}))
        started.append(daemon)
        return daemon.start()

    try:
        yield start
    finally:
        for daemon in started:
            daemon.stop()
