"""The suppression list of report destinations, on every supported database,
and the ``dmarcmilter suppress`` command."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from dmarcmilter.config import config_from_mapping
from dmarcmilter.errors import ConfigError, InputError
from dmarcmilter.history import db
from dmarcmilter.report import suppression
from dmarcmilter.report.suppression import (
    MAX_REASON_CHARS,
    BounceRule,
    SuppressionSource,
    is_suppressed,
    record_hard_bounce,
)

NOW = dt.datetime(2026, 12, 5, 6, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
RULE = BounceRule(threshold=3, period=dt.timedelta(days=30))


def test_add_list_remove(engine: Engine) -> None:
    entry = suppression.add(
        engine, " Dmarc@Reports.EXAMPLE.net ", "spam trap", expires=30 * DAY, now=NOW
    )
    assert entry.target == "dmarc@reports.example.net"
    assert (entry.reason, entry.source) == ("spam trap", SuppressionSource.MANUAL)
    assert (entry.suppressed_at, entry.expires_at) == (NOW, NOW + 30 * DAY)
    suppression.add(engine, "Spam.Example.", "abusive rua", expires=None, now=NOW)
    listed = suppression.entries(engine)
    assert [(e.target, e.is_domain, e.expires_at) for e in listed] == [
        ("dmarc@reports.example.net", False, NOW + 30 * DAY),
        ("spam.example", True, None),
    ]
    assert all(e.state(NOW) == "suppressed" for e in listed)
    assert suppression.remove(engine, "SPAM.example")
    assert not suppression.remove(engine, "spam.example")
    assert [e.target for e in suppression.entries(engine)] == ["dmarc@reports.example.net"]


def test_add_replaces_an_entry(engine: Engine) -> None:
    suppression.add(engine, "a@example.net", "first", expires=DAY, now=NOW)
    later = NOW + 2 * DAY
    entry = suppression.add(engine, "A@example.net", "second", expires=None, now=later)
    assert (entry.reason, entry.suppressed_at, entry.expires_at) == ("second", later, None)
    assert entry.created_at == NOW
    assert len(suppression.entries(engine)) == 1


def test_expiry(engine: Engine) -> None:
    suppression.add(engine, "a@example.net", "x", expires=DAY, now=NOW)
    assert is_suppressed(engine, "a@example.net", now=NOW + DAY - dt.timedelta(seconds=1))
    assert is_suppressed(engine, "a@example.net", now=NOW + DAY) is None
    (entry,) = suppression.entries(engine)
    assert entry.state(NOW + DAY) == "expired"
    # A "never" entry is still there in ten years.
    suppression.add(engine, "b@example.net", "x", expires=None, now=NOW)
    assert is_suppressed(engine, "b@example.net", now=NOW + 3650 * DAY)


def test_domain_entry_covers_addresses_and_subdomains(engine: Engine) -> None:
    suppression.add(engine, "spam.example", "abusive", expires=None, now=NOW)
    for address in (
        "x@spam.example",
        "X@SPAM.EXAMPLE.",
        "reports@a.b.spam.example",
        # An IDN address is looked up by its A-label.
        "x@bücher.spam.example",
    ):
        found = is_suppressed(engine, address, now=NOW)
        assert found is not None and found.target == "spam.example", address
    # Neither a name that only ends with the same letters, nor a parent,
    # nor a sibling.
    for address in ("x@notspam.example", "x@example", "x@ham.example", "spam.example@other.net"):
        assert is_suppressed(engine, address, now=NOW) is None, address


def test_address_entry_is_that_address_only(engine: Engine) -> None:
    suppression.add(engine, "dead@example.net", "bounces", expires=None, now=NOW)
    assert is_suppressed(engine, "DEAD@example.NET", now=NOW)
    assert is_suppressed(engine, "live@example.net", now=NOW) is None
    assert is_suppressed(engine, "dead@sub.example.net", now=NOW) is None


def test_nearest_entry_wins_and_many_addresses_at_once(engine: Engine) -> None:
    suppression.add(engine, "example.net", "domain", expires=None, now=NOW)
    suppression.add(engine, "a.example.net", "subdomain", expires=None, now=NOW)
    suppression.add(engine, "x@a.example.net", "address", expires=None, now=NOW)
    found = suppression.suppressed_by(
        engine, ["x@a.example.net", "y@a.example.net", "z@example.net", "z@example.org"], now=NOW
    )
    assert {a: e.reason for a, e in found.items()} == {
        "x@a.example.net": "address",
        "y@a.example.net": "subdomain",
        "z@example.net": "domain",
    }


def test_lookup_of_garbage_never_raises(engine: Engine) -> None:
    for address in ("", "@", "no-at-sign", "a@" + "x." * 200 + "com", "a@\x00.example"):
        assert is_suppressed(engine, address, now=NOW) is None
    # Bounded: the nearest names only, and none longer than a target.
    names = suppression.lookup_names("a@" + "x." * 200 + "com")
    assert len(names) <= suppression.MAX_LOOKUP_NAMES
    assert names[0] == "x." * 125 + "com"
    assert names[-1] == "com"


@pytest.mark.parametrize(
    "target",
    [
        "",
        "com",
        "a@",
        "@example.com",
        "a b@example.com",
        "<a@example.com>",
        "x@-bad-.com",
        "a@example.com\nBcc: x@y.z",
        "x" * 250 + "@example.com",
    ],
)
def test_bad_targets_are_refused(engine: Engine, target: str) -> None:
    with pytest.raises(InputError):
        suppression.add(engine, target, "x", expires=None, now=NOW)
    assert suppression.entries(engine) == []


def test_reason_is_one_bounded_line(engine: Engine) -> None:
    entry = suppression.add(
        engine, "a@example.net", "550\r\n5.1.1\tunknown\x1b[31m" + "x" * 2000, expires=None
    )
    assert entry.reason.startswith("550 5.1.1 unknown [31m")
    assert len(entry.reason) == MAX_REASON_CHARS
    assert entry.reason.endswith("...")


def test_hard_bounces_suppress_at_the_threshold(engine: Engine) -> None:
    address = "Dead@Example.net"
    for n in (1, 2):
        entry = record_hard_bounce(engine, address, f"550 no ({n})", RULE, now=NOW + n * DAY)
        assert (entry.bounces, entry.suppressed_at) == (n, None)
        assert entry.state(NOW) == "counting"
        assert is_suppressed(engine, address, now=NOW + n * DAY) is None
    third = NOW + 3 * DAY
    entry = record_hard_bounce(engine, address, "550 5.1.1 user unknown", RULE, now=third)
    assert entry.target == "dead@example.net"
    assert (entry.bounces, entry.source, entry.reason) == (
        3,
        SuppressionSource.BOUNCE,
        "550 5.1.1 user unknown",
    )
    assert (entry.suppressed_at, entry.expires_at) == (third, third + RULE.period)
    assert is_suppressed(engine, address, now=third)
    # For the period only.
    assert is_suppressed(engine, address, now=third + RULE.period) is None


def test_bounce_count_starts_again_after_a_quiet_period(engine: Engine) -> None:
    record_hard_bounce(engine, "a@example.net", "x", RULE, now=NOW)
    record_hard_bounce(engine, "a@example.net", "x", RULE, now=NOW + DAY)
    # 31 days without a bounce: the old ones no longer count.
    entry = record_hard_bounce(engine, "a@example.net", "x", RULE, now=NOW + 32 * DAY)
    assert (entry.bounces, entry.suppressed_at) == (1, None)


def test_smarthost_rejections_count_and_say_so(engine: Engine) -> None:
    rule = BounceRule(threshold=1, period=7 * DAY)
    entry = record_hard_bounce(
        engine, "a@example.net", "554 5.7.1 rejected", rule, source=SuppressionSource.SMARTHOST
    )
    assert entry.source is SuppressionSource.SMARTHOST
    assert is_suppressed(engine, "a@example.net")


def test_bounces_leave_a_manual_entry_alone(engine: Engine) -> None:
    suppression.add(engine, "a@example.net", "by hand", expires=None, now=NOW)
    for n in range(4):
        entry = record_hard_bounce(engine, "a@example.net", "550", RULE, now=NOW + n * DAY)
    assert (entry.source, entry.reason, entry.expires_at, entry.bounces) == (
        SuppressionSource.MANUAL,
        "by hand",
        None,
        4,
    )


def test_an_expired_entry_is_suppressed_again(engine: Engine) -> None:
    rule = BounceRule(threshold=1, period=DAY)
    record_hard_bounce(engine, "a@example.net", "first", rule, now=NOW)
    later = NOW + 10 * DAY
    assert is_suppressed(engine, "a@example.net", now=later) is None
    entry = record_hard_bounce(engine, "a@example.net", "again", rule, now=later)
    assert (entry.reason, entry.expires_at) == ("again", later + DAY)


def test_remove_resets_the_bounce_count(engine: Engine) -> None:
    for n in range(3):
        record_hard_bounce(engine, "a@example.net", "550", RULE, now=NOW + n * DAY)
    assert is_suppressed(engine, "a@example.net", now=NOW + 3 * DAY)
    assert suppression.remove(engine, "a@example.net")
    entry = record_hard_bounce(engine, "a@example.net", "550", RULE, now=NOW + 4 * DAY)
    assert (entry.bounces, entry.suppressed_at) == (1, None)


def test_a_bounce_names_an_address(engine: Engine) -> None:
    with pytest.raises(InputError):
        record_hard_bounce(engine, "example.net", "550", RULE)


def test_concurrent_bounces_are_all_counted(migrated: str) -> None:
    # Several report runs or milter threads recording bounces of one
    # address at once: no lost update, one row.
    engines = [db.make_engine(migrated) for _ in range(4)]
    rule = BounceRule(threshold=1000, period=30 * DAY)
    errors: list[BaseException] = []

    def bounce(engine: Engine) -> None:
        try:
            for _ in range(5):
                record_hard_bounce(engine, "a@example.net", "550", rule, now=NOW)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=bounce, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        (entry,) = suppression.entries(engines[0])
        assert entry.bounces == 20
    finally:
        for e in engines:
            e.dispose()


def test_bounce_rule_from_config() -> None:
    config = config_from_mapping({"report": {"suppress_after_bounces": 5, "suppress_days": 7}})
    assert BounceRule.from_config(config) == BounceRule(5, dt.timedelta(days=7))
    assert BounceRule.from_config(config_from_mapping({})) == RULE
    for key, value in (("suppress_after_bounces", 0), ("suppress_days", 0)):
        with pytest.raises(ConfigError, match=rf"report\.{key}: must be at least 1"):
            config_from_mapping({"report": {key: value}}, "x.toml")


# -- dmarcmilter suppress ------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dmarcmilter", "suppress", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'h.sqlite3'}"
    db.upgrade(url)
    return url


def test_cli_add_list_remove(sqlite_url: str) -> None:
    proc = cli(
        "add",
        "Dead@Example.NET",
        "--reason",
        "mailbox gone",
        "--expires",
        "30d",
        "--url",
        sqlite_url,
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.startswith("suppressed dead@example.net until 20")
    assert proc.stdout.endswith(" (30d)\n")
    # The default: for ever.
    proc = cli("add", "spam.example", "--reason", "abusive rua", "--url", sqlite_url)
    assert proc.stdout == "suppressed spam.example (and every name under it) for ever\n"
    proc = cli("list", "--url", sqlite_url)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["TARGET", "STATE", "SOURCE", "BOUNCES", "EXPIRES", "REASON"]
    assert lines[1].split()[:4] == ["dead@example.net", "suppressed", "manual", "0"]
    assert lines[1].endswith("mailbox gone")
    assert lines[2].split()[:5] == ["spam.example", "suppressed", "manual", "0", "never"]
    proc = cli("list", "--json", "--url", sqlite_url)
    data = json.loads(proc.stdout)
    assert [(d["target"], d["state"], d["expires_at"]) for d in data] == [
        ("dead@example.net", "suppressed", data[0]["expires_at"]),
        ("spam.example", "suppressed", None),
    ]
    assert dt.datetime.fromisoformat(data[0]["expires_at"]).tzinfo is not None
    proc = cli("remove", "SPAM.example", "--url", sqlite_url)
    assert (proc.returncode, proc.stdout) == (0, "removed spam.example\n")
    proc = cli("remove", "spam.example", "--url", sqlite_url)
    assert proc.returncode == 1
    assert proc.stdout == "spam.example is not on the suppression list\n"
    proc = cli("list", "--url", sqlite_url)
    assert [line.split()[0] for line in proc.stdout.splitlines()[1:]] == ["dead@example.net"]


def test_cli_empty_list(sqlite_url: str) -> None:
    proc = cli("list", "--url", sqlite_url)
    assert (proc.returncode, proc.stdout) == (0, "The suppression list is empty.\n")
    proc = cli("list", "--json", "--url", sqlite_url)
    assert (proc.returncode, proc.stdout) == (0, "[]\n")


def test_cli_uses_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "d.toml"
    conf.write_text(f'[paths]\nstate_dir = "{tmp_path / "st"}"\n')
    db.upgrade(f"sqlite:///{tmp_path / 'st' / 'history.sqlite3'}")
    proc = cli("add", "example.net", "--reason", "x", "--config", str(conf))
    assert proc.returncode == 0, proc.stderr
    proc = cli("list", "--config", str(conf))
    assert "example.net" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("add", "a@example.net", "--url", "{url}"), "required: --reason"),
        (("add", "not an address", "--reason", "x", "--url", "{url}"), "not an address"),
        (("add", "com", "--reason", "x", "--url", "{url}"), "top-level domain"),
        (
            ("add", "a@example.net", "--reason", "x", "--expires", "3x", "--url", "{url}"),
            "--expires: expected",
        ),
        (
            ("add", "a@example.net", "--reason", "x", "--expires", "0d", "--url", "{url}"),
            "--expires: expected",
        ),
        (("add", "a@example.net", "--reason", "", "--url", "{url}"), "--reason: must not be"),
        (("remove", "<a@example.net>", "--url", "{url}"), "unsupported local part"),
        (("list", "--url", "oracle://h/db"), "--url: unsupported database 'oracle'"),
        (("list", "--url", "sqlite:///{tmp}/empty.db"), "database schema is at nothing"),
        (("list", "--config", "/nonexistent.toml"), "/nonexistent.toml: file not found"),
        (("frobnicate",), "invalid choice"),
    ],
)
def test_cli_bad_input(
    tmp_path: Path, sqlite_url: str, args: tuple[str, ...], message: str
) -> None:
    proc = cli(*(a.replace("{url}", sqlite_url).replace("{tmp}", str(tmp_path)) for a in args))
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]
    assert lines[0].startswith("dmarcmilter suppress")
