"""``dmarcmilter impact``: a history of known rows in a real database gives
exact counts for each stricter setting, in the table and in JSON, and the
HTML page renders in a real browser.

The rows are what the real policy step records: each is built from
:func:`dmarcmilter.policy.decide` on an evaluation with the given facts,
under the configuration the history was recorded with (monitor mode, a
trusted ARC sealer), so the override reasons and dispositions are the ones
the milter stores.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import insert
from sqlalchemy.engine import Engine

from dmarcmilter import impact
from dmarcmilter.config import PolicyConfig
from dmarcmilter.dmarc import DMARCResultCode, OverrideReason, PolicyOverride
from dmarcmilter.history.models import MessageRow
from dmarcmilter.history.rows import new_idempotency_key, record_key
from dmarcmilter.policy import Action, decide
from dmarcmilter.record import Policy
from tests.browser import BrowserUnavailable, render
from tests.conftest import IN_CI, ROOT
from tests.history_worker import BASE_MESSAGE

SQLITE_ONLY = pytest.mark.parametrize("migrated", ["sqlite"], indirect=True)

SEALER = "arc.example.net"
# How the history was recorded: monitor mode, one trusted sealer, the rest
# as the defaults.
RECORDED = PolicyConfig(monitor=True, trusted_arc_sealers=(SEALER,))
SINCE = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
UNTIL = dt.datetime(2026, 5, 2, tzinfo=dt.UTC)
NOON = dt.datetime(2026, 5, 1, 12, 5, tzinfo=dt.UTC)
ONE_PM = dt.datetime(2026, 5, 1, 13, 30, tzinfo=dt.UTC)
HOSTILE_HELO = '<script>alert("x")</script>\'><img src=http://198.51.100.1/x>'
INCOMPLETE = PolicyOverride(
    OverrideReason.LOCAL_POLICY,
    "pass treated as fail: the From field names more domains than were evaluated",
)


def evaluation(
    result: str,
    policy: str | None,
    *,
    domain: str | None = "bank.example",
    mailing_list: bool = False,
    vouch: str | None = None,
    in_scope: bool = True,
    reasons: tuple[PolicyOverride, ...] = (),
) -> Any:
    """What decide() reads of an evaluation, with these facts."""
    dmarc = SimpleNamespace(
        author_domain=domain,
        policy_domain=domain,
        policy=Policy(policy) if policy else None,
        result=DMARCResultCode(result),
        malformed_from="",
        reasons=reasons,
    )
    author = SimpleNamespace(
        status=SimpleNamespace(in_scope=in_scope),
        reason="two From fields" if not in_scope else "",
        recovery_incomplete=False,
        domain=domain if in_scope else None,
    )
    return SimpleNamespace(dmarc=dmarc, author=author, mailing_list=mailing_list, arc_vouch=vouch)


def row_of(ev: Any, config: PolicyConfig, at: dt.datetime, **columns: Any) -> dict[str, Any]:
    """The stored row: decide()'s disposition and override reasons, encoded
    as rows.message_row encodes them."""
    decision = decide(ev, config)
    reasons = [[r.reason.value, r.comment] for r in decision.reasons]
    domain = ev.dmarc.policy_domain
    row = {
        **BASE_MESSAGE,
        "header_from_domain": ev.dmarc.author_domain,
        "policy_domain": domain,
        "org_domain": domain,
        "p": ev.dmarc.policy.value if ev.dmarc.policy else None,
        "dmarc_result": ev.dmarc.result.value,
        "policy_evaluated": ev.dmarc.policy.value if ev.dmarc.policy else None,
        "disposition": decision.disposition.value,
        "mailing_list": ev.mailing_list,
        "reasons_summary": json.dumps(reasons, separators=(",", ":"), ensure_ascii=False)
        if reasons
        else "[]",
        **columns,
        "arrived_at": at,
        "idempotency_key": new_idempotency_key(),
    }
    row["record_key"] = record_key(row)
    return row


SPOOF = {
    "client_ip": "203.0.113.9",
    "helo": HOSTILE_HELO,
    "envelope_from_domain": "spoof.example",
    "spf_domain": "spoof.example",
    "spf_result": "fail",
    "spf_aligned": False,
    "dkim_aligned": False,
    "dkim_summary": "[]",
}
LIST = {
    "client_ip": "198.51.100.20",
    "helo": "lists.example.org",
    "envelope_from_domain": "lists.example.org",
    "spf_domain": "lists.example.org",
    "spf_aligned": False,
    "dkim_aligned": False,
    "dkim_summary": '[["bank.example","s1","fail"]]',
}
ARC = {
    "client_ip": "192.0.2.50",
    "helo": "mx.arc.example.net",
    "envelope_from_domain": "arc.example.net",
    "arc_result": "pass",
    "spf_aligned": False,
    "dkim_aligned": False,
    "dkim_summary": "[]",
}
FORWARDER = {
    "client_ip": "192.0.2.77",
    "helo": "smtp.fwd.example.net",
    "envelope_from_domain": "fwd.example.net",
    "spf_domain": "fwd.example.net",
    "spf_result": "pass",
    "spf_aligned": False,
    "dkim_aligned": False,
    "dkim_summary": '[["bank.example","s1","fail"]]',
}
MALFORMED = {
    "client_ip": "192.0.2.99",
    "helo": "odd.example",
    "envelope_from_domain": "odd.example",
}


def history() -> list[dict[str, Any]]:
    """The known history; the expected counts below are worked out from it
    by hand."""
    rows: list[tuple[int, Any, PolicyConfig, dt.datetime, dict[str, Any]]] = [
        # bank.example, p=reject: 10 passes (the 13:00 hour) ...
        (10, evaluation("pass", "reject"), RECORDED, ONE_PM, {}),
        # ... 7 direct failures from a spoofer with a hostile HELO, and 2
        # more from it before monitor mode was switched on (quarantined) ...
        (7, evaluation("fail", "reject"), RECORDED, NOON, SPOOF),
        (2, evaluation("fail", "reject"), PolicyConfig(trusted_arc_sealers=(SEALER,)), NOON, SPOOF),
        # ... 4 list messages, 3 vouched for by the trusted ARC sealer, 2
        # through a forwarder that rewrote the envelope and broke DKIM ...
        (4, evaluation("fail", "reject", mailing_list=True), RECORDED, NOON, LIST),
        (3, evaluation("fail", "reject", vouch=SEALER), RECORDED, NOON, ARC),
        (2, evaluation("fail", "reject"), RECORDED, NOON, FORWARDER),
        # ... a temperror burst: 5 with the policy known, 1 whose discovery
        # itself failed (no policy) ...
        (5, evaluation("temperror", "reject"), RECORDED, NOON, {}),
        (1, evaluation("temperror", None), RECORDED, NOON, {"p": None}),
        # ... and one malformed From whose domains were not all evaluated.
        (
            1,
            evaluation("fail", "reject", in_scope=False, reasons=(INCOMPLETE,)),
            RECORDED,
            NOON,
            MALFORMED,
        ),
        # shop.example, p=quarantine.
        (6, evaluation("pass", "quarantine", domain="shop.example"), RECORDED, NOON, {}),
        (3, evaluation("fail", "quarantine", domain="shop.example"), RECORDED, NOON, SPOOF),
        (2, evaluation("temperror", "quarantine", domain="shop.example"), RECORDED, NOON, {}),
        (1, evaluation("temperror", "none", domain="shop.example"), RECORDED, NOON, {}),
        # news.example, p=none: nothing would change.
        (4, evaluation("fail", "none", domain="news.example"), RECORDED, NOON, SPOOF),
        # Two From fields, nothing evaluated: permerror, no policy domain.
        (
            2,
            evaluation("permerror", None, domain=None, in_scope=False),
            RECORDED,
            NOON,
            MALFORMED,
        ),
        # Outside the window.
        (5, evaluation("fail", "reject"), RECORDED, SINCE - dt.timedelta(hours=1), SPOOF),
    ]
    return [row_of(ev, config, at, **cols) for n, ev, config, at, cols in rows for _ in range(n)]


def store(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(insert(MessageRow), history())


def changed(n: int, **changes: int) -> dict[str, Any]:
    return {"changed": n, "changes": {k.replace("_to_", "->"): v for k, v in changes.items()}}


NOTHING = changed(0)
# Under the recording configuration with monitor off.
EXPECTED_BANK = {
    "domain": "bank.example",
    "messages": 35,
    "results": {"fail": 19, "pass": 10, "temperror": 6},
    # policy_evaluated: the failed discovery has none.
    "policies": {"no_policy": 1, "reject": 34},
    "dispositions": {"none": 23, "pass": 10, "quarantine": 2},
    "monitored": 14,
    "reasons": {"mailing_list": 4, "out_of_scope": 1, "trusted_forwarder": 3},
    "applied": {"accept": 19, "quarantine": 16},
    "settings": {
        # The spoofer's 9, the forwarder's 2, the malformed From; the list
        # mail keeps its downgrade and the vouched mail its override.
        "enforce_reject": changed(12, quarantine_to_reject=12),
        "enforce_reject_domain": changed(12, quarantine_to_reject=12),
        # Without enforcement, list mail is quarantined either way.
        "no_mailing_list_downgrade": NOTHING,
        "no_trusted_forwarder": changed(3, accept_to_quarantine=3),
        "temperror_tempfail": changed(6, accept_to_tempfail=6),
        "out_of_scope_reject": changed(1, quarantine_to_reject=1),
    },
    "failing_sources": [
        {
            "client_ip": "203.0.113.9",
            "helo": HOSTILE_HELO,
            "envelope_from_domain": "spoof.example",
            "messages": 9,
            "class": "other",
        },
        {
            "client_ip": "198.51.100.20",
            "helo": "lists.example.org",
            "envelope_from_domain": "lists.example.org",
            "messages": 4,
            "class": "mailing_list",
        },
        {
            "client_ip": "192.0.2.50",
            "helo": "mx.arc.example.net",
            "envelope_from_domain": "arc.example.net",
            "messages": 3,
            "class": "arc_forwarder",
        },
        {
            "client_ip": "192.0.2.77",
            "helo": "smtp.fwd.example.net",
            "envelope_from_domain": "fwd.example.net",
            "messages": 2,
            "class": "forwarder_pattern",
        },
        {
            "client_ip": "192.0.2.99",
            "helo": "odd.example",
            "envelope_from_domain": "odd.example",
            "messages": 1,
            "class": "other",
        },
    ],
}
EXPECTED_SHOP_SETTINGS = {
    "enforce_reject": NOTHING,
    "enforce_reject_domain": NOTHING,
    "no_mailing_list_downgrade": NOTHING,
    "no_trusted_forwarder": NOTHING,
    # p=none is known to change nothing, so its temperror is not deferred.
    "temperror_tempfail": changed(2, accept_to_tempfail=2),
    "out_of_scope_reject": NOTHING,
}
EXPECTED_TOTAL_SETTINGS = {
    "enforce_reject": changed(12, quarantine_to_reject=12),
    "no_mailing_list_downgrade": NOTHING,
    "no_trusted_forwarder": changed(3, accept_to_quarantine=3),
    "temperror_tempfail": changed(8, accept_to_tempfail=8),
    "out_of_scope_reject": changed(3, accept_to_reject=2, quarantine_to_reject=1),
}
EXPECTED_TIMELINE = [
    {"bucket": "2026-05-01 12", "fail": 26, "pass": 6, "permerror": 2, "temperror": 9},
    {"bucket": "2026-05-01 13", "pass": 10},
]


def write_config(path: Path, url: str, **policy: Any) -> Path:
    lines = ["[database]", f'url = "{url}"', "[policy]", "monitor = true"]
    lines.append(f'trusted_arc_sealers = ["{SEALER}"]')
    lines += [f"{key} = {json.dumps(value)}" for key, value in policy.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dmarcmilter", "impact", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


WINDOW = ("--since", "2026-05-01T00:00:00Z", "--until", "2026-05-02T00:00:00Z")


def test_json_counts_every_setting_exactly(migrated: str, engine: Engine, tmp_path: Path) -> None:
    store(engine)
    config = write_config(tmp_path / "c.toml", migrated)
    done = cli("--config", str(config), *WINDOW, "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["window"] == {
        "since": "2026-05-01T00:00:00Z",
        "until": "2026-05-02T00:00:00Z",
        "bucket": "hour",
    }
    assert data["monitor"] is True
    assert [d["domain"] for d in data["domains"]] == [
        "bank.example",
        "shop.example",
        "news.example",
    ]
    bank, shop, news = data["domains"]
    assert bank == EXPECTED_BANK
    assert shop["messages"] == 12
    assert shop["applied"] == {"accept": 9, "quarantine": 3}
    assert shop["settings"] == EXPECTED_SHOP_SETTINGS
    assert news["applied"] == {"accept": 4}
    assert all(s["changed"] == 0 for s in news["settings"].values())
    assert data["total"]["messages"] == 53
    assert data["total"]["settings"] == EXPECTED_TOTAL_SETTINGS
    assert data["total"]["failing_sources"] == []
    assert data["timeline"] == EXPECTED_TIMELINE


def test_domain_and_top_select_what_is_shown(migrated: str, engine: Engine, tmp_path: Path) -> None:
    store(engine)
    config = write_config(tmp_path / "c.toml", migrated)
    done = cli("--config", str(config), *WINDOW, "--json", "--top", "1", "--sources", "2")
    data = json.loads(done.stdout)
    assert [d["domain"] for d in data["domains"]] == ["bank.example"]
    assert data["domains"][0]["failing_sources"] == EXPECTED_BANK["failing_sources"][:2]
    done = cli("--config", str(config), *WINDOW, "--json", "--domain", "Shop.Example.")
    data = json.loads(done.stdout)
    assert [d["domain"] for d in data["domains"]] == ["shop.example"]
    assert data["domains"][0]["settings"] == EXPECTED_SHOP_SETTINGS
    assert data["total"]["messages"] == 12


def test_enforcing_config_makes_the_list_downgrade_matter(
    migrated: str, engine: Engine, tmp_path: Path
) -> None:
    """With rejection enforced for the domain, the list downgrade and the
    trusted forwarder are what keep mail from being rejected."""
    store(engine)
    config = write_config(tmp_path / "c.toml", migrated, enforce_reject_domains=["bank.example"])
    done = cli("--config", str(config), *WINDOW, "--json", "--domain", "bank.example")
    bank = json.loads(done.stdout)["domains"][0]
    assert bank["applied"] == {"accept": 19, "quarantine": 4, "reject": 12}
    assert bank["settings"] == {
        "enforce_reject": NOTHING,
        "enforce_reject_domain": NOTHING,
        "no_mailing_list_downgrade": changed(4, quarantine_to_reject=4),
        "no_trusted_forwarder": changed(3, accept_to_reject=3),
        "temperror_tempfail": changed(6, accept_to_tempfail=6),
        # The malformed From is rejected already.
        "out_of_scope_reject": NOTHING,
    }


def test_list_mail_is_known_without_its_override_reason(engine: Engine) -> None:
    """Since schema 0005 a row says whether it was list mail, whatever the
    policy step did with it: list mail under p=quarantine (no downgrade, no
    reason) is classified as such, and list mail a trusted sealer vouched
    for would be downgraded, not rejected, without the sealer."""
    vouched_list = evaluation("fail", "reject", mailing_list=True, vouch=SEALER)
    vouched = evaluation("fail", "reject", vouch=SEALER)
    quarantined_list = evaluation("fail", "quarantine", domain="shop.example", mailing_list=True)
    rows = [
        *(row_of(vouched_list, RECORDED, NOON, **ARC) for _ in range(2)),
        row_of(vouched, RECORDED, NOON, **ARC),
        *(row_of(quarantined_list, RECORDED, NOON, **LIST) for _ in range(3)),
    ]
    assert [r["reasons_summary"].count("mailing_list") for r in rows] == [0] * 6
    with engine.begin() as conn:
        conn.execute(insert(MessageRow), rows)
    enforcing = PolicyConfig(enforce_reject=True, trusted_arc_sealers=(SEALER,))
    view = impact.compute(engine, enforcing, impact.Window(SINCE, UNTIL)).as_dict()
    bank = next(d for d in view["domains"] if d["domain"] == "bank.example")
    assert bank["settings"]["no_trusted_forwarder"] == changed(
        3, accept_to_quarantine=2, accept_to_reject=1
    )
    shop = next(d for d in view["domains"] if d["domain"] == "shop.example")
    assert [s["class"] for s in shop["failing_sources"]] == ["mailing_list"]


def test_table_shows_the_counts(migrated: str, engine: Engine, tmp_path: Path) -> None:
    store(engine)
    config = write_config(tmp_path / "c.toml", migrated)
    done = cli("--config", str(config), *WINDOW)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "Window 2026-05-01T00:00:00Z .. 2026-05-02T00:00:00Z: 53 messages" in out
    assert "Monitor mode is on" in out
    bank = out.split("== bank.example ==")[1].split("== shop.example ==")[0]
    lines = [line.split() for line in bank.splitlines()]
    assert ["messages", "35"] in lines
    assert "  applied       accept 19, quarantine 16" in bank
    assert "  policy        no_policy 1, reject 34" in bank
    enforce = next(line for line in bank.splitlines() if "enforce_reject = true" in line)
    assert enforce.split()[-3:] == ["12", "quarantine->reject", "12"]
    assert '  temperror_action = "tempfail"' in bank
    tempfail = next(line for line in bank.splitlines() if "temperror_action" in line)
    assert tempfail.split()[-3:] == ["6", "accept->tempfail", "6"]
    no_list = next(line for line in bank.splitlines() if "mailing_list_downgrade" in line)
    assert no_list.split()[-2:] == ["0", "-"]
    no_arc = next(line for line in bank.splitlines() if "trusted_arc_sealers" in line)
    assert no_arc.split()[-3:] == ["3", "accept->quarantine", "3"]
    # The hostile HELO is printed as stored text, with no control characters.
    assert "9  other" in bank and HOSTILE_HELO in bank


def test_rules_agree_with_the_policy_step() -> None:
    """applied() on the facts a stored row shows gives the action decide()
    takes, for every combination the row can tell apart, under every
    setting the view varies."""
    seen = 0
    for result, policy, ml, vouch, listed in itertools.product(
        ("pass", "fail", "temperror", "none", "permerror"),
        (None, "none", "quarantine", "reject"),
        (False, True),
        (None, SEALER),
        (False, True),
    ):
        if ml and vouch:
            # A vouched message never reached the list check: not stored.
            continue
        ev = evaluation(result, policy, mailing_list=ml, vouch=vouch)
        stored = row_of(ev, RECORDED, NOON)
        facts = impact.Facts(
            result,
            policy,
            listed=listed,
            mailing_list='["mailing_list",' in stored["reasons_summary"],
            trusted_forwarder='["trusted_forwarder",' in stored["reasons_summary"],
        )
        for enforce, downgrade, sealers, temperror, quarantine in itertools.product(
            (False, True),
            (False, True),
            ((), (SEALER,)),
            ("accept", "tempfail"),
            ("header", "accept", "reject"),
        ):
            config = PolicyConfig(
                enforce_reject=enforce,
                enforce_reject_domains=("bank.example",) if listed else (),
                mailing_list_downgrade=downgrade,
                trusted_arc_sealers=sealers,
                temperror_action=temperror,
                quarantine_action=quarantine,
            )
            want = decide(ev, config).action
            assert want is not Action.TEMPFAIL or result == "temperror"
            got = impact.applied(facts, impact.Settings.of(config))
            assert got == want.value, (result, policy, ml, vouch, listed, config)
            seen += 1
    assert seen > 2000


def test_out_of_scope_rules_agree_with_the_policy_step() -> None:
    for out_of_scope in ("evaluate", "accept", "reject"):
        config = PolicyConfig(out_of_scope=out_of_scope)
        s = impact.Settings.of(config)
        none = evaluation("permerror", None, domain=None, in_scope=False)
        facts = impact.Facts("permerror", None, out_of_scope=True)
        assert impact.applied(facts, s) == decide(none, config).action.value
        if out_of_scope != "accept":
            # Under "accept" a recovered domain is never evaluated.
            recovered = evaluation("fail", "reject", in_scope=False, reasons=(INCOMPLETE,))
            facts = impact.Facts("fail", "reject", incomplete=True)
            assert impact.applied(facts, s) == decide(recovered, config).action.value


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--days", "0"), "--days: expected 1 to 3660, got 0"),
        (("--days", "2", "--since", "2026-05-01"), "--days cannot be combined"),
        (("--until", "2026-05-01"), "--until needs --since"),
        (("--since", "yesterday"), "--since: expected an ISO 8601 time"),
        (("--since", "2026-05-02", "--until", "2026-05-01"), "is not after --since"),
        (("--top", "0"), "--top: expected 1 to 500, got 0"),
        (("--sources", "101"), "--sources: expected 0 to 100, got 101"),
        (("--domain", "bad..domain"), "--domain:"),
        (("--url", "nosuch://x"), "--url:"),
        (("--html", "/nonexistent/dir/page.html"), "--html: cannot write"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    migrated: str, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    config = write_config(tmp_path / "c.toml", migrated)
    done = cli("--config", str(config), *args)
    assert done.returncode == 2, done
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert message in done.stderr


def test_an_unmigrated_database_is_refused(tmp_path: Path) -> None:
    done = cli("--url", f"sqlite:///{tmp_path / 'empty.sqlite3'}")
    assert done.returncode == 2
    assert "run `dmarcmilter db upgrade`" in done.stderr
    assert done.stderr.count("\n") == 1


@SQLITE_ONLY
def test_html_escapes_every_value(migrated: str, engine: Engine, tmp_path: Path) -> None:
    store(engine)
    page = tmp_path / "impact.html"
    config = write_config(tmp_path / "c.toml", migrated)
    done = cli("--config", str(config), *WINDOW, "--html", str(page))
    assert done.returncode == 0, done.stderr
    text = page.read_text()
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&#x27;&gt;&lt;img" in text
    assert "<img" not in text

    tags: set[str] = set()
    names: set[str] = set()

    class Tags(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            tags.add(tag)
            names.update(name for name, _ in attrs)

    Tags().feed(text)
    # Markup of the page's own only: nothing that loads or runs anything.
    assert tags <= {
        "html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "div", "span",
        "i", "table", "tr", "th", "td", "svg", "text", "line", "rect",
    }  # fmt: skip
    assert not names & {"src", "href", "xlink:href", "action", "onload", "onerror"}


@SQLITE_ONLY
def test_html_renders_in_chromium(migrated: str, engine: Engine, tmp_path: Path) -> None:
    store(engine)
    page = tmp_path / "impact.html"
    config = write_config(tmp_path / "c.toml", migrated)
    done = cli("--config", str(config), *WINDOW, "--html", str(page))
    assert done.returncode == 0, done.stderr
    shot = tmp_path / "impact.png"
    try:
        seen = render(
            page,
            shot,
            tmp_path / "chromium-profile",
            ("svg.chart.timeline", "svg.chart.settings", "svg.chart.timeline rect", "script"),
        )
    except BrowserUnavailable as exc:
        if IN_CI:
            pytest.fail(f"chromium is needed in CI: {exc}")
        pytest.skip(str(exc))
    assert seen.errors == []
    assert [u for u in seen.requests if not u.startswith(("file:", "data:"))] == []
    assert seen.requests == [page.as_uri()]
    # The timeline and one settings chart per section (all domains and 3).
    assert seen.count("svg.chart.timeline") == 1
    assert seen.count("svg.chart.settings") == 4
    # Bars were drawn: 5 results in the noon hour, 1 at one o'clock.
    assert seen.count("svg.chart.timeline rect") == 5
    assert seen.count("script") == 0
    assert shot.stat().st_size > 5000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_narrow_window_counts_only_its_rows(engine: Engine) -> None:
    """Five rows of 58 arrived the hour before: on SQLite a window that
    narrow is read through the arrived_at index, a wide one is not; the
    counts are those of the window either way."""
    store(engine)
    before = impact.Window(SINCE - dt.timedelta(hours=1), SINCE)
    view = impact.compute(engine, RECORDED, before).as_dict()
    assert view["total"]["messages"] == 5
    (bank,) = view["domains"]
    assert bank["settings"]["enforce_reject"] == changed(5, quarantine_to_reject=5)
    assert bank["failing_sources"] == [{**EXPECTED_BANK["failing_sources"][0], "messages": 5}]
    assert view["timeline"] == [{"bucket": "2026-04-30 23", "fail": 5}]
    whole = impact.compute(engine, RECORDED, impact.Window(SINCE, UNTIL)).as_dict()
    assert whole["domains"][0] == EXPECTED_BANK


def test_the_table_shows_no_control_characters() -> None:
    """A HELO name is the client's choice: an escape sequence in it must not
    reach the operator's terminal."""
    summary = impact.Summary("bank.example", messages=1)
    summary.sources.append(
        {
            "client_ip": "192.0.2.1",
            "helo": "evil\x1b]0;owned\x07\x1b[2J\r\nfake line",
            "envelope_from_domain": "x\x9bexample",
            "messages": 1,
            "class": "other",
        }
    )
    view = impact.Impact(
        impact.Window(SINCE, UNTIL), impact.Settings(), False, impact.Summary(None), [summary], []
    )
    text = "\n".join(impact.to_table(view))
    assert "evil?]0;owned??[2J??fake line  x?example" in text
    assert not any(c in text for c in "\x1b\x07\r\x9b")
