"""No history row lost, through the real daemon: a database that goes away
(a proxy in front of PostgreSQL), a state directory that fills up or is
read-only (a small tmpfs), and a daemon killed under load.

Every message that got its end-of-message reply must have exactly one row
afterwards, or be counted in the daemon's log as lost when neither the
state directory nor the database could keep it.  What is checked is only
what an operator can see: rows in the database, log lines, and the files
left in the state directory.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dmarcmilter.history import db
from tests.conftest import IN_CI
from tests.daemon import MilterDaemon
from tests.dnsserver import TestDNSServer
from tests.faults import (
    TRAFFIC_ZONE,
    FaultProxy,
    Tally,
    Tmpfs,
    Traffic,
    fill,
    kill,
    last_stopped,
    lost_in_log,
    mount_unavailable,
    proxied,
    restart,
    rows_per_queue_id,
    state_files,
    wait_rows,
)

Start = Callable[..., MilterDaemon]
Mount = Callable[[Path, int], Tmpfs]

# Journal and spool files as any version names them: one row per line.
ROW_FILES = re.compile(r"history-(journal\.\d+|spool)\.jsonl")
# The line that says why the database is unavailable.
UNAVAILABLE = re.compile(r"history database unavailable \((.*?)\)")
REPLAYED = re.compile(r"replayed: \d+ rows stored")


@pytest.fixture
def start(tmp_path: Path, dns_server: TestDNSServer) -> Iterator[Start]:
    """Start ``dmarcmilter run`` processes, each in its own directory (its
    state directory is ``DIR/state``); ``mount`` is called with that path
    first when given, to put the state directory on its own file system."""
    dns_server.set_zone(TRAFFIC_ZONE)
    daemons: list[MilterDaemon] = []

    def start_daemon(
        config: dict[str, Any] | None = None,
        *,
        prepare: Callable[[Path], object] | None = None,
    ) -> MilterDaemon:
        directory = tmp_path / f"d{len(daemons)}"
        directory.mkdir()
        daemon = MilterDaemon(directory, dns_server.port, config)
        if prepare is not None:
            prepare(daemon.state_dir)
        daemons.append(daemon)
        return daemon.start()

    yield start_daemon
    for daemon in daemons:
        daemon.stop()


@pytest.fixture
def mount() -> Iterator[Mount]:
    """Mount small tmpfs file systems; unmounted at the end of the test.
    Needs root: skipped with the reason outside CI, failed in CI."""
    reason = mount_unavailable()
    if reason is not None:
        if IN_CI:
            pytest.fail(f"mounting a tmpfs is required in CI: {reason}")
        pytest.skip(f"cannot mount a tmpfs here: {reason}")
    mounts: list[Tmpfs] = []

    def make(path: Path, size: int) -> Tmpfs:
        mounts.append(Tmpfs(path, size))
        return mounts[-1]

    yield make
    for fs in reversed(mounts):
        fs.unmount()


@pytest.fixture
def pg(pg_db: str) -> Iterator[tuple[FaultProxy, str]]:
    """The test's PostgreSQL database, migrated, behind a fault proxy: the
    proxy and the URL through it."""
    db.upgrade(pg_db)
    with proxied(pg_db) as (proxy, url):
        yield proxy, url


def journaled_rows(state_dir: Path) -> int:
    """Rows waiting in the state directory (journal or spool lines)."""
    return sum(
        path.read_bytes().count(b"\n")
        for path in state_dir.iterdir()
        if ROW_FILES.fullmatch(path.name)
    )


def wait_journaled(state_dir: Path, n: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while journaled_rows(state_dir) < n:
        assert time.monotonic() < deadline, f"{journaled_rows(state_dir)} of {n} rows journaled"
        time.sleep(0.05)


def wait_replayed(daemon: MilterDaemon, before: int, timeout: float = 30.0) -> None:
    """Wait for one more "... replayed: N rows stored" line than ``before``."""
    deadline = time.monotonic() + timeout
    while len(REPLAYED.findall(daemon.log_text())) <= before:
        assert time.monotonic() < deadline, daemon.log_text()[-3000:]
        time.sleep(0.05)


def assert_exactly_once(url: str, traffics: list[Traffic]) -> Tally:
    counts = rows_per_queue_id(url)
    tally = Tally.of(traffics, counts)
    replied = Tally.owed(traffics)
    assert (tally.lost, tally.duplicated) == (0, 0), (tally, *tally.problems(counts, replied))
    return tally


# -- a stale offset ------------------------------------------------------------------


def test_a_full_disk_during_a_replay_makes_no_later_row_skipped(
    start: Start, mount: Mount, pg: tuple[FaultProxy, str]
) -> None:
    """The disk fills while a replay runs; later an outage journals 1,500
    rows and the daemon is restarted cleanly: all 1,500 are stored.

    (With an offset kept on disk, the disk left room for the first batch's
    offset only; the final "offset 0" could not be written, the spool was
    truncated anyway, and the next start skipped the first 1,000 rows of
    the new spool as already replayed.)"""
    proxy, url = pg
    proxy.down()
    daemon = start({"database": {"url": url}}, prepare=lambda path: mount(path, 6 << 20))
    # More than one batch (1,000 rows) waits for the database.
    before = Traffic(daemon.socket, 1200, prefix="A").run()
    assert len(before.replied) == 1200, before.summary()
    wait_journaled(daemon.state_dir, 1200)
    # One page of room: enough for one small file, not for two.
    filler = fill(daemon.state_dir, leave=4096)
    proxy.up()
    wait_replayed(daemon, 0)
    assert wait_rows(url, 1200).total() == 1200
    filler.unlink()

    proxy.down()
    during = Traffic(daemon.socket, 1500, prefix="B").run()
    assert len(during.replied) == 1500, during.summary()
    assert daemon.stop() == 0
    proxy.up()
    replays = len(REPLAYED.findall(daemon.log_text()))
    restart(daemon)
    wait_replayed(daemon, replays)
    assert daemon.stop() == 0
    tally = assert_exactly_once(url, [before, during])
    assert tally.stored == 2700
    assert lost_in_log(daemon) == 0


# -- a process kill -------------------------------------------------------------------


@pytest.mark.parametrize("database", ["sqlite", "postgresql", "postgresql-down"])
def test_sigkill_under_load_loses_no_replied_message(
    start: Start, request: pytest.FixtureRequest, database: str
) -> None:
    """Four MTA connections send at full speed; the daemon is killed in the
    middle; after a restart on the same state directory every message that
    got its reply has exactly one row."""
    config: dict[str, Any] = {}
    proxy: FaultProxy | None = None
    if database != "sqlite":
        proxy, url = request.getfixturevalue("pg")
        config = {"database": {"url": url}}
        if database == "postgresql-down":
            proxy.down()
    daemon = start(config)
    url = config["database"]["url"] if config else daemon.database_url
    traffic = Traffic(daemon.socket, 5000, prefix="K", threads=4).start()
    traffic.wait_replied(700)
    assert kill(daemon) == -9
    traffic.stop()
    traffic.join()
    assert 700 <= len(traffic.replied) < 5000, traffic.summary()
    if proxy is not None:
        proxy.up()
    restart(daemon)
    counts = wait_rows(url, len(traffic.replied))
    assert daemon.stop() == 0
    tally = assert_exactly_once(url, [traffic])
    assert counts.total() >= tally.replied
    assert lost_in_log(daemon) == 0


# -- a full or read-only state directory ------------------------------------------------


def test_a_full_state_dir_with_the_database_down_loses_only_what_it_counts(
    start: Start, mount: Mount, pg: tuple[FaultProxy, str]
) -> None:
    """The journal's file system fills up while the database is down: the
    rows it cannot take wait in memory and are lost at shutdown, counted
    exactly in the log; every other row is stored once after a restart,
    and nothing but the journal is left behind."""
    proxy, url = pg
    proxy.down()
    daemon = start({"database": {"url": url}}, prepare=lambda path: mount(path, 512 << 10))
    traffic = Traffic(daemon.socket, 1000, prefix="F").run()
    assert len(traffic.replied) == 1000, traffic.summary()
    assert daemon.stop() == 0
    lost = lost_in_log(daemon)
    assert 0 < lost < 1000, daemon.log_text()[-3000:]
    first_stop = last_stopped(daemon)
    proxy.up()
    replays = len(REPLAYED.findall(daemon.log_text()))
    restart(daemon)
    wait_replayed(daemon, replays)
    assert daemon.stop() == 0
    counts = rows_per_queue_id(url)
    tally = Tally.of([traffic], counts)
    assert (tally.duplicated, tally.stored + lost) == (0, 1000), tally
    # The lines that say so add up to the writer's own count, and the
    # restart lost nothing.
    assert lost_in_log(daemon) == lost
    assert (first_stop.get("rows_lost"), last_stopped(daemon).get("rows_lost")) == (str(lost), "0")
    files = state_files(daemon.state_dir)
    assert not [name for name in files if "rejected" in name or name.endswith(".tmp")], files
    assert not [name for name, size in files.items() if not size and "lock" not in name], files


def test_a_read_only_state_dir_at_start_continues_with_history_in_the_database(
    start: Start, mount: Mount, pg: tuple[FaultProxy, str]
) -> None:
    """paths.unwritable_state_dir = "continue" (the default): mail flows,
    rows go straight to the database, and the log says why."""
    _, url = pg

    def read_only(path: Path) -> None:
        mount(path, 1 << 20).remount(read_only=True)

    daemon = start({"database": {"url": url}}, prepare=read_only)
    traffic = Traffic(daemon.socket, 200, prefix="R").run()
    assert set(traffic.replied.values()) == {"continue"}, traffic.summary()
    assert len(traffic.replied) == 200
    wait_rows(url, 200)
    assert daemon.stop() == 0
    assert_exactly_once(url, [traffic])
    errors = [
        line["msg"]
        for line in daemon.log_lines()
        if line.get("level") == "error" and str(daemon.state_dir) in line.get("msg", "")
    ]
    assert errors and "Read-only file system" in errors[0], daemon.log_text()[-3000:]
    assert lost_in_log(daemon) == 0


def test_a_read_only_state_dir_at_start_can_refuse_to_start(
    tmp_path: Path, mount: Mount, dns_server: TestDNSServer, pg: tuple[FaultProxy, str]
) -> None:
    """paths.unwritable_state_dir = "refuse": exit status 2 and one error
    line, no traceback, naming the state directory and the reason."""
    config = {"paths": {"unwritable_state_dir": "refuse"}, "database": {"url": pg[1]}}
    daemon = MilterDaemon(tmp_path, dns_server.port, config)
    mount(daemon.state_dir, 1 << 20).remount(read_only=True)
    proc = subprocess.run(daemon.command(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    # Log lines may come first; the reason to stop is the last line.
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("dmarcmilter run: error: "), proc.stderr
    assert proc.stderr.count("dmarcmilter run: error: ") == 1, proc.stderr
    assert str(daemon.state_dir) in last and "Read-only file system" in last, last


def test_the_database_down_at_start_is_logged_with_its_reason(
    start: Start, pg: tuple[FaultProxy, str]
) -> None:
    proxy, url = pg
    proxy.down()
    daemon = start({"database": {"url": url}})
    assert daemon.stop() == 0
    reasons = UNAVAILABLE.findall(daemon.log_text())
    assert reasons, daemon.log_text()
    assert all("Connection refused" in reason for reason in reasons), reasons


def test_sigterm_under_load_records_every_accepted_message(start: Start) -> None:
    """A clean stop while MTA connections keep sending: every message the
    MTA was told to take has its row after a restart; a message begun
    after the stop started is tempfailed (the MTA retries it), never
    accepted without a row."""
    daemon = start()
    traffic = Traffic(daemon.socket, 5000, prefix="S", threads=4, per_session=5000).start()
    traffic.wait_replied(500)
    assert daemon.stop() == 0
    traffic.stop()
    traffic.join()
    restart(daemon)
    wait_rows(daemon.database_url, len(Tally.owed([traffic])))
    assert daemon.stop() == 0
    tally = assert_exactly_once(daemon.database_url, [traffic])
    assert tally.replied >= 500
    assert lost_in_log(daemon) == 0
