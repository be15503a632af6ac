"""Fuzz benchmark: a million hostile inputs through every parser a sender
reaches and through the whole end-of-message path.

Targets
-------
``from``     :func:`dmarcmilter.author.extract_author` on one or two From fields;
             an OK result must name a domain the field names.
``record``   :func:`dmarcmilter.record.parse_record`; a usable record's tags,
             written out again, must mean the same.
``authres``  :func:`dmarcmilter.authres.parse.parse` (only AuthResSyntaxError
             may escape) and ``authserv_id_of`` (never raises, agrees with parse).
``dkim``     :func:`dmarcmilter.dkim.verify_dkim` on a message with random
             DKIM-Signature fields (and mutated real signatures); nothing passes
             whose signature or body was damaged.
``arc``      :func:`dmarcmilter.arc.verify_arc` on random and mutated ARC sets.
``eom``      the milter object (:class:`dmarcmilter.milter.DMARCMilter`) driven
             from connect to end of message: evaluate, decide, plan, render and
             the header and reply calls, checked the way libmilter would.  No
             internal error may be logged, every forged A-R carrying our
             authserv-id must be removed, and a DMARC failure under
             p=reject/quarantine must not leave unmarked.

Inputs are generated cheaply from one seeded ``random.Random``: half from a
grammar of hostile values (display names with addresses, groups, routes,
encoded words, comments, IDNs, domain literals; DMARC tag lists; A-R
resinfos; DKIM and ARC tag lists), half by mutating a corpus of real-looking
seeds (insert a special, cut, duplicate, splice, flip to a byte that is not
UTF-8, fold).  DNS is a loopback test server (tests/dnsserver.py) started
here, serving victim domains with p=reject and p=quarantine, an SPF record
that passes anyone, a SERVFAIL name and real DKIM keys; no network.

Every crash (an exception a target does not document, or a broken invariant)
is counted, and the first input of each distinct crash (target, exception
type, place) is saved as JSON under ``--out`` (a fresh temporary directory
by default; the path is printed), to be replayed with ``--replay FILE``.
The slowest input per target is reported too ("max ms"), and one taking
over SLOW_SECONDS is saved alike: bounded work per message is a property.

    .venv/bin/python -m bench.fuzz [--inputs 1000000] [--seconds S] [--out DIR]
        [--seed 1] [--jobs 1] [--targets from,record,...]
    .venv/bin/python -m bench.fuzz --replay DIR/eom-....json
    .venv/bin/python -m bench.fuzz --atheris TARGET [-- libFuzzer options]

``--atheris`` (needs ``pip install atheris``) runs one target under
coverage-guided libFuzzer instead, feeding it the fuzzer's bytes.

Target: 1,000,000 inputs in at most 30 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import multiprocessing
import random
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import Milter

from dmarcmilter.arc import MAX_ARC_SETS, verify_arc
from dmarcmilter.author import extract_author
from dmarcmilter.authres.parse import (
    AuthResSyntaxError,
    AuthResults,
    authserv_id_of,
    parse,
    same_authserv_id,
)
from dmarcmilter.config import Config, DNSConfig, PolicyConfig
from dmarcmilter.dkim import verify_dkim
from dmarcmilter.domains import normalize_domain
from dmarcmilter.milter import CONTINUE, REJECT, TEMPFAIL, DMARCMilter, MilterState, Runtime
from dmarcmilter.record import DMARCRecord, RecordStatus, parse_record
from dmarcmilter.resolver import Resolver, ResolverSettings
from dmarcmilter.results import ARCOutcome, ARCResultCode, AuthorStatus, DKIMOutcome, DKIMResultCode
from tests.dnsserver import TestDNSServer
from tests.hostile import named_in
from tests.inprocess import MilterContext
from tests.signing import arc_seal, dkim_sign, dkim_zone, make_message

AUTHSERV_ID = "mx.receiver.example"
NOW = 1_700_000_000.0  # fixed verification time: the test signatures carry t=

ZONE: dict[str, Any] = {
    "_dmarc.victim.example": [("TXT", "v=DMARC1; p=reject; rua=mailto:agg@victim.example")],
    "_dmarc.bank.example": [("TXT", "v=DMARC1; p=quarantine; sp=reject; np=reject")],
    "_dmarc.example": [("TXT", "v=DMARC1; p=reject; psd=y")],
    "_dmarc.list.example": [("TXT", "v=DMARC1; p=none")],
    "victim.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all"), ("A", "192.0.2.10")],
    "bank.example": [("TXT", "v=spf1 include:_spf.bank.example ~all")],
    "_spf.bank.example": [("TXT", "v=spf1 ip4:198.51.100.0/24 -all")],
    "attacker.net": [("TXT", "v=spf1 +all")],
    "_dmarc.attacker.net": [("TXT", "v=DMARC1; p=none")],
    "_dmarc.broken.example": "SERVFAIL",
    "broken.example": "SERVFAIL",
    **dkim_zone("victim.example", "s1"),
    **dkim_zone("victim.example", "ed", "ed25519"),
    **dkim_zone("forwarder.example", "arc"),
}

# -- cheap generators ---------------------------------------------------------------------------

DOMAINS = [
    "victim.example",
    "Victim.EXAMPLE.",
    "bank.example",
    "sub.bank.example",
    "attacker.net",
    "broken.example",
    "list.example",
    "bücher.example",
    "xn--bcher-kva.example",
    "\u212aiosk.example",
    "ｖｉｃｔｉｍ.example",
    "victim . example",
    "victim(c).example",
    "[192.0.2.1]",
    "[IPv6:2001:db8::1]",
    "-bad-.example",
    "a" * 64 + ".example",
    "exa mple.com",
    "victim.example%",
    "",
    ".",
    "victim..example",
    "x" * 250 + ".example",
]
DISPLAYS = [
    "",
    "CEO",
    '"CEO, Bank"',
    '"ceo@victim.example"',
    "ceo@victim.example",
    "=?utf-8?q?ceo@victim.example?=",
    "=?utf-8?b?Y2VvQHZpY3RpbS5leGFtcGxl?=",
    "(Bank)",
    "Bank (ceo@victim.example)",
    "Jörg",
    '"unterminated',
    "\\",
]
_CLEAN_DOMAINS = ["victim.example", "bank.example", "sub.bank.example", "attacker.net",
                  "list.example", "broken.example", "nx.example", "sub.victim.example"]  # fmt: skip
LOCALS = ["ceo", '"john doe"', "a.b", "a . b", "", "@", "x+tag", "ünïcode", '"a\\"b"']
SPECIALS = [
    "<", ">", "@", ",", ";", ":", ".", '"', "\\", "(", ")", "[", "]", "=", "/", " ", "\t",
    "\r\n ", "\n\t", "\r", "\n", "\x00", "\x7f", "\udc80", "\udcff", "\u212a", "é", "%", "%%",
    "=?", "?=", "xn--", "v=DMARC1", "i=1;", "dkim=pass", "reason=", "header.d=",
]  # fmt: skip
FOLDS = ["\r\n ", "\r\n\t", "\n ", " ", ""]


def _domain(r: random.Random) -> str:
    if r.random() < 0.85:
        return r.choice(DOMAINS)
    return ".".join(
        "".join(r.choice("abcxyz-09é") for _ in range(r.randint(0, 8)))
        for _ in range(r.randint(1, 4))
    )


def gen_from(r: random.Random) -> str:
    parts = []
    for _ in range(r.choice((1, 1, 1, 2, 3))):
        display, local, domain = r.choice(DISPLAYS), r.choice(LOCALS), _domain(r)
        form = r.randrange(7)
        if form == 0:
            parts.append(f"{display} <{local}@{domain}>")
        elif form == 1:
            parts.append(f"{local}@{domain}")
        elif form == 2:
            parts.append(f"{local}@{domain} ({display})")
        elif form == 3:
            parts.append(f"{display}: {local}@{domain}{r.choice([';', '', ',;'])}")
        elif form == 4:
            parts.append(f"<@relay.example,@r2.example:{local}@{domain}>")
        elif form == 5:
            parts.append(f"{display} <{local}@{domain}>{r.choice(['>', ' (', '<', ')'])}")
        else:
            parts.append(f"{display}{r.choice(FOLDS)}<{local}{r.choice(FOLDS)}@{domain}>")
    return r.choice([", ", ",", " ", "; ", "\r\n\t, "]).join(parts)


_RECORD_VALUES = {
    "v": ["DMARC1", "dmarc1", "DMARC2"],
    "p": ["reject", "quarantine", "none", "REJECT", "rejected", ""],
    "sp": ["reject", "none", "bogus"],
    "np": ["reject", "quarantine", "x"],
    "adkim": ["r", "s", "S", "x"],
    "aspf": ["r", "s", ""],
    "psd": ["y", "n", "u", "yes"],
    "t": ["y", "n", "Y", "1"],
    "pct": ["0", "100", "50", "101", "-1", "9" * 40],
    "fo": ["0", "1", "d", "s", "1:d:s", "0:1", "d:d", ""],
    "rua": ["mailto:agg@victim.example", "mailto:a@b.example!10m,mailto:c@d.example",
            "mailto:%61@x.example", "https://r.example/a", "mailto:", "mailto:x@", "bad uri",
            "mailto:a@b.example!", "mailto:a%zz@b.example"],
    "ruf": ["mailto:f@victim.example", ""],
    "ri": ["86400", "x"],
    "rf": ["afrf", "afrf:iodef", "::"],
}  # fmt: skip


def gen_record(r: random.Random) -> str:
    names = list(_RECORD_VALUES)
    tags = ["v=DMARC1"] if r.random() < 0.9 else []
    for _ in range(r.randint(0, 7)):
        name = r.choice(names) if r.random() < 0.9 else r.choice(["X", "p ", "", "é"])
        value = r.choice(_RECORD_VALUES.get(name.strip(), ["?"]))
        tags.append(f"{name}{r.choice(['=', ' = ', '=', '=='])}{value}")
    return r.choice(["; ", ";", " ; ", ";\t"]).join(tags) + r.choice(["", ";", "; ", " "])


_METHODS = ["spf", "dkim", "dmarc", "arc", "auth", "iprev", "x-foo", "none"]
_RESULTS = ["pass", "fail", "none", "neutral", "softfail", "temperror", "permerror", "policy"]
_PROPS = ["smtp.mailfrom", "header.d", "header.i", "header.from", "header.b", "policy.dmarc",
          "smtp.helo", "smtp.auth", "action", "x-bits"]  # fmt: skip
_PVALUES = ["victim.example", "a@victim.example", "@victim.example", '"john doe"@x.example',
            "ab/+=CD", "2001:db8::1", "<>", '"quoted ; value"', "", "reject"]  # fmt: skip
_COMMENTS = ["comment", "nested (c)", "esc \\) x", "bad ("]
_IDS = [AUTHSERV_ID, AUTHSERV_ID.upper(), AUTHSERV_ID + ".", "mx.\u212aiosk.example",
        '"mx.receiver.example"', "mx.other.example", "i=1; mx.example"]  # fmt: skip


def gen_authres(r: random.Random) -> str:
    text = r.choice(_IDS) if r.random() < 0.9 else ""
    if r.random() < 0.2:
        text += f" {r.choice(['1', '2', '(c) 1', '99999999999'])}"
    results = []
    for _ in range(r.randint(0, 5)):
        method = r.choice(_METHODS)
        if r.random() < 0.1:
            method += "/1"
        res = f"{method}={r.choice(_RESULTS)}"
        if r.random() < 0.3:
            res += f" ({r.choice(_COMMENTS)})"
        if r.random() < 0.3:
            res += f' reason="{r.choice(["ok", "bad sig", "x;y", ""])}"'
        for _ in range(r.randint(0, 3)):
            res += f" {r.choice(_PROPS)}={r.choice(_PVALUES)}"
        results.append(res)
    sep = r.choice([";", "; ", ";\r\n\t", " ;"])
    body = sep.join(results) if results else r.choice(["none", "", ";"])
    return f"{text}{sep}{body}" if text else body


_B64 = ["YWJj", "Zm9vYmFy", "AAAA", "=", "", "Zm9v\r\n Zm9v", "!!!", "A" * 400]
_DKIM_VALUES = {
    "v": ["1", "2", ""],
    "a": ["rsa-sha256", "ed25519-sha256", "rsa-sha1", "RSA-SHA256", "x"],
    "c": ["relaxed/relaxed", "simple", "relaxed", "simple/bogus", "/"],
    "d": DOMAINS,
    "s": ["s1", "ed", "missing", "a.b", "", "_x", "s1."],
    "h": ["from:to:subject", "From", "to", "from::to", "", "from:from:from"],
    "bh": _B64,
    "b": _B64,
    "i": ["@victim.example", "x@sub.victim.example", "@other.example", "@"],
    "l": ["0", "10", "99999999999999999999999", "-1", "x"],
    "q": ["dns/txt", "dns", "x:dns/txt"],
    "t": ["1", "9999999999", "x"],
    "x": ["1", "9999999999", ""],
    "z": ["From:a@b|To:c", ""],
}
_ARC_VALUES = {
    **_DKIM_VALUES,
    "i": ["1", "2", "0", "51", "x", "1 ", "-1"],
    "cv": ["none", "pass", "fail", "bogus"],
}


def _tag_list(r: random.Random, values: dict[str, list[str]], required: tuple[str, ...]) -> str:
    names = [n for n in required if r.random() < 0.9]
    names += [r.choice(list(values)) for _ in range(r.randint(0, 4))]
    r.shuffle(names)
    tags = [f"{n}{r.choice(['=', ' = ', '='])}{r.choice(values[n])}" for n in names]
    return r.choice(["; ", ";", ";\r\n\t"]).join(tags)


def gen_dkim_value(r: random.Random) -> str:
    return " " + _tag_list(r, _DKIM_VALUES, ("v", "a", "b", "bh", "d", "h", "s"))


def gen_arc_fields(r: random.Random) -> list[tuple[str, str]]:
    fields = []
    for instance in range(1, r.randint(1, 3) + 1):
        for name in ("ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results"):
            if r.random() < 0.1:
                continue
            if name == "ARC-Authentication-Results":
                fields.append((name, f" i={instance}; {gen_authres(r)}"))
            else:
                tags = ("i", "a", "b", "d", "s", "cv") if name == "ARC-Seal" else ("i", "a", "b",
                        "bh", "d", "h", "s")  # fmt: skip
                value = _tag_list(r, _ARC_VALUES, tags)
                fields.append(
                    (name, f" i={instance}; {value}" if r.random() < 0.7 else " " + value)
                )
    r.shuffle(fields)
    return fields


def mutate(r: random.Random, text: str, corpus: list[str]) -> str:
    """A few random edits: insert a special or any character, cut, repeat or
    splice a span, truncate."""
    for _ in range(r.randint(1, 4)):
        at = r.randint(0, len(text))
        op = r.randrange(7)
        if op == 0:
            text = text[:at] + r.choice(SPECIALS) + text[at:]
        elif op == 1:
            text = text[:at] + text[at + r.randint(1, 10) :]
        elif op == 2 and len(text) < 4000:
            end = min(len(text), at + r.randint(1, 40))
            text = text[:end] + text[at:end] * r.randint(1, 4) + text[end:]
        elif op == 3:
            code = r.choice(
                (r.randint(0, 0x7F), r.randint(0x80, 0x2FFF), r.randint(0xDC80, 0xDCFF))
            )
            text = text[:at] + chr(code) + text[at + 1 :]
        elif op == 4:
            other = r.choice(corpus)
            cut = r.randint(0, len(other))
            text = text[:at] + other[cut:]
        elif op == 5:
            text = text[:at]
        else:
            text = text[:at] + r.choice(FOLDS) + text[at:]
    return text


# -- targets ------------------------------------------------------------------------------------


class Invariant(AssertionError):
    """A target returned, but with a result that breaks a property.  ``kind``
    names the property (without the input's details), for telling crashes
    apart."""

    def __init__(self, what: str, kind: str) -> None:
        super().__init__(what)
        self.kind = kind


def check(condition: bool, what: str, kind: str | None = None) -> None:
    if not condition:
        raise Invariant(what, kind or what)


def run_from(values: list[str]) -> None:
    result = extract_author([("From", v) for v in values])
    check(result.reason.isprintable(), "reason not printable")
    if result.status is AuthorStatus.OK:
        check(len(values) == 1 and result.domain is not None, "OK without one domain")
        assert result.domain is not None
        check(normalize_domain(result.domain) == result.domain, "domain not normalised")
        check(named_in(result.domain, values[0]), f"{result.domain} not in the field", "domain")
    else:
        check(result.domain is None, "a domain with a failure status")


def _record_text(record: DMARCRecord) -> str:
    tags = [f"p={record.p.value}"]
    tags += [f"sp={record.sp.value}"] if record.sp else []
    tags += [f"np={record.np.value}"] if record.np else []
    tags += [f"adkim={record.adkim.value}", f"aspf={record.aspf.value}"]
    tags += [f"t={'y' if record.testing else 'n'}", f"psd={record.psd.value}", f"fo={record.fo}"]
    tags += ["rua=" + ",".join(record.rua)] if record.rua else []
    tags += ["ruf=" + ",".join(record.ruf)] if record.ruf else []
    return "v=DMARC1; " + "; ".join(tags)


def _meaning(record: DMARCRecord) -> tuple[Any, ...]:
    return (record.p, record.sp, record.np, record.adkim, record.aspf, record.testing,
            record.psd, record.fo, record.rua, record.ruf)  # fmt: skip


def run_record(text: str) -> None:
    for np_supported in (True, False):
        record = parse_record(text, np_supported=np_supported)
        check(record.raw == text, "raw differs")
        if record.usable:
            again = parse_record(_record_text(record), np_supported=np_supported)
            check(again.status is RecordStatus.VALID, "written-out record invalid")
            check(_meaning(again) == _meaning(record), "tags do not round-trip")


def run_authres(text: str) -> None:
    authserv_id = authserv_id_of(text)
    check(authserv_id is None or bool(authserv_id), "empty authserv-id")
    try:
        parsed = parse(text)
    except AuthResSyntaxError:
        return
    check(isinstance(parsed, AuthResults), "wrong type")
    check(parsed.authserv_id == (authserv_id or ""), "authserv_id_of disagrees with parse")


def _message(fields: list[tuple[str, str]], body: str) -> str:
    """A message as text (bytes that are not UTF-8 kept as surrogates)."""
    return "".join(f"{name}:{value}\r\n" for name, value in fields) + "\r\n" + body


@dataclass
class Harness:
    """What the DNS-using targets share: the loopback DNS server, a resolver
    and the milter state."""

    server: TestDNSServer
    resolver: Resolver
    states: dict[str, MilterState]
    errors: list[logging.LogRecord] = field(default_factory=list)


def run_dkim(harness: Harness, message: str) -> None:
    raw = message.encode("utf-8", "surrogateescape")
    outcome = verify_dkim(raw, harness.resolver.session(), now=NOW)
    check(isinstance(outcome, DKIMOutcome), "wrong type")
    for sig in outcome.signatures:
        check(isinstance(sig.result, DKIMResultCode), "wrong result type")
        check(not sig.domain or normalize_domain(sig.domain) == sig.domain, "domain not normal")


def run_arc(harness: Harness, message: str) -> None:
    raw = message.encode("utf-8", "surrogateescape")
    outcome = verify_arc(raw, harness.resolver.session())
    check(isinstance(outcome, ARCOutcome) and isinstance(outcome.result, ARCResultCode), "type")
    check(len(outcome.hops) <= MAX_ARC_SETS, "too many hops")
    instances = [hop.instance for hop in outcome.hops]
    check(instances == sorted(set(instances)), "hops out of order")


def _error_kind(record: logging.LogRecord) -> str:
    """An error log line's exception type and where it was raised."""
    if not record.exc_info or record.exc_info[1] is None:
        return record.msg if isinstance(record.msg, str) else "error"
    exc = record.exc_info[1]
    tb = traceback.extract_tb(exc.__traceback__)
    return f"{type(exc).__name__}@{tb[-1].filename}:{tb[-1].lineno}" if tb else type(exc).__name__


def _error_text(record: logging.LogRecord) -> str:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        text += f" ({type(exc).__name__}: {exc}{where})"
    return text


def run_eom(harness: Harness, case: dict[str, Any]) -> None:
    """One connection, one transaction, as libmilter would call the milter."""
    harness.errors.clear()
    context = MilterContext(case["macros"])
    state = harness.states[case.get("config", "default")]
    milter = DMARCMilter(state)
    milter._setctx(context)
    milter._protocol = Milter.P_HDR_LEADSPC
    if case["connect"]:
        milter.connect(case["host"], socket.AF_INET, (case["ip"], 25))
    milter.hello(case["helo"])
    milter.envfrom(case["mail_from"])
    milter.envrcpt("<user@receiver.example>")
    for name, value in case["headers"]:
        milter.header(name, value if value.startswith(" ") else " " + value)
    milter.eoh()
    milter.body(case["body"].encode("utf-8", "surrogateescape"))
    code = milter.eom()
    milter.close()
    check(
        not harness.errors,
        "; ".join(_error_text(e) for e in harness.errors),
        "; ".join(_error_kind(e) for e in harness.errors),
    )
    check(code in (CONTINUE, REJECT, TEMPFAIL), f"bad reply code {code}", "reply code")
    check(state.active == 0, "transaction not ended")
    removed = {c[2] for c in context.calls if c[0] == "chgheader" and c[3] is None}
    index = 0
    # A refused message needs no cleaning; one that is delivered (or held)
    # must carry no field that claims to be ours.
    for name, value in case["headers"] if code == CONTINUE else ():
        if name.strip(" \t").lower() != "authentication-results":
            continue
        index += 1
        sid = authserv_id_of(value)
        if sid is not None and same_authserv_id(sid, AUTHSERV_ID):
            check(index in removed, f"forged A-R #{index} with our authserv-id kept", "forged A-R")
    ours = [c[2] for c in context.calls if c[0] == "addheader" and c[1] == "Authentication-Results"]
    check(len(ours) <= 1, "more than one A-R of ours", "several A-R")
    if ours:
        # Our own field must read back with our own parser (a relay behind
        # us, or this host on the next hop, reads it).
        try:
            own = parse(ours[0])
        except AuthResSyntaxError as exc:
            raise Invariant(f"our A-R does not parse: {exc}", "own A-R unparsable") from None
        dmarc = own.by_method("dmarc")
        failed = dmarc and dmarc[0].result == "fail"
        policy = dmarc[0].get("policy.dmarc") if dmarc else None
        if failed and policy in ("reject", "quarantine"):
            marked = any(
                c[0] in ("quarantine", "setreply")
                or (c[0] == "addheader" and c[1] == "X-Spam-Flag")
                for c in context.calls
            )
            check(marked, f"dmarc=fail policy.dmarc={policy} delivered unmarked", "unmarked")


# -- seeds and the input stream -----------------------------------------------------------------


def _signed_seeds() -> list[str]:
    plain = make_message(from_="CEO <ceo@victim.example>", to="x@receiver.example")
    signed = [
        dkim_sign(plain, "victim.example", "s1"),
        dkim_sign(plain, "victim.example", "ed", "ed25519"),
    ]
    sealed = arc_seal(signed[0], "forwarder.example", "arc")
    return [m.decode("utf-8", "surrogateescape") for m in (*signed, sealed)]


def _split(message: str) -> tuple[list[tuple[str, str]], str]:
    head, _, body = message.partition("\r\n\r\n")
    fields: list[tuple[str, str]] = []
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + "\n" + line)
        else:
            name, _, value = line.partition(":")
            fields.append((name, value))
    return fields, body


class Inputs:
    """The generators, grammar and mutation, one per target."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)
        r = self.r
        self.from_corpus = [gen_from(r) for _ in range(200)] + [
            "CEO <ceo@bank.example> (",
            "CEO <ceo@bank.example>>",
            "ceo@victim.example, ceo@attacker.net",
            "undisclosed-recipients:;",
            "=?utf-8?q?=E2=80=AE?= <a@victim.example>",
        ]
        self.record_corpus = [gen_record(r) for _ in range(200)]
        self.ar_corpus = [gen_authres(r) for _ in range(200)]
        self.signed = _signed_seeds()
        self.dkim_corpus = [gen_dkim_value(r) for _ in range(100)] + [
            v for s in self.signed for n, v in _split(s)[0] if n.lower() == "dkim-signature"
        ]

    def _pick(self, grammar: Callable[[random.Random], str], corpus: list[str]) -> str:
        r = self.r
        if r.random() < 0.5:
            return grammar(r)
        return mutate(r, r.choice(corpus), corpus)

    def from_(self) -> list[str]:
        values = [self._pick(gen_from, self.from_corpus)]
        if self.r.random() < 0.05:
            values.append(self._pick(gen_from, self.from_corpus))
        return values

    def record(self) -> str:
        return self._pick(gen_record, self.record_corpus)

    def authres(self) -> str:
        return self._pick(gen_authres, self.ar_corpus)

    def dkim(self) -> str:
        r = self.r
        if r.random() < 0.3:
            # A real signed message, damaged anywhere (header or body).
            seed = r.choice(self.signed)
            return mutate(r, seed, self.signed) if r.random() < 0.9 else seed
        fields = [("DKIM-Signature", self._pick(gen_dkim_value, self.dkim_corpus))]
        fields += [("DKIM-Signature", gen_dkim_value(r)) for _ in range(r.choice((0, 0, 1, 3)))]
        fields += [("From", " " + self._pick(gen_from, self.from_corpus)), ("Subject", " x")]
        return _message(fields, r.choice(["", "body\r\n", "x" * 200]))

    def arc(self) -> str:
        r = self.r
        if r.random() < 0.3:
            return mutate(r, self.signed[2], self.signed)
        fields = gen_arc_fields(r)
        if r.random() < 0.3:
            at = r.randrange(len(fields)) if fields else 0
            if fields:
                fields[at] = (fields[at][0], mutate(r, fields[at][1], self.ar_corpus))
        fields += [("From", " ceo@victim.example"), ("Subject", " x")]
        return _message(fields, "body\r\n")

    def eom(self) -> dict[str, Any]:
        r = self.r
        if r.random() < 0.25:
            # A signed (and sometimes sealed) message, with its own From.
            fields, body = _split(r.choice(self.signed))
            extra_from = r.random() < 0.1
        else:
            fields, body = [], r.choice(["", "hello\r\n", "x" * 1000])
            extra_from = r.random() < 0.97
        if extra_from:
            # Half the time one clean address, so that most messages get a
            # DMARC verdict rather than a permerror.
            if r.random() < 0.5:
                domain = r.choice(_CLEAN_DOMAINS)
                value = f"{r.choice(DISPLAYS[:3])} <ceo@{domain}>"
            else:
                value = self.from_()[0]
            fields.insert(r.randint(0, len(fields)), ("From", " " + value))
        for _ in range(r.choice((0, 0, 1, 2))):
            fields.insert(r.randint(0, len(fields)), ("Authentication-Results", self.authres()))
        if r.random() < 0.2:
            fields.insert(0, ("DKIM-Signature", self._pick(gen_dkim_value, self.dkim_corpus)))
        if r.random() < 0.1:
            fields[:0] = gen_arc_fields(r)
        if r.random() < 0.05:
            fields.append(("List-Id", " <x.list.example>"))
        if r.random() < 0.003:
            # A flood of junk signatures with long names: what this one
            # message can put into our own header fields and replies.
            for n in range(r.randint(50, 300)):
                d = f"{'d' * r.randint(1, 60)}.{n}.example"
                sel = "s" * r.randint(1, 200)
                fields.insert(0, ("DKIM-Signature", f" v=1; a=rsa-sha256; d={d}; s={sel}; "
                                  "h=from; bh=YWJj; b=YWJj"))  # fmt: skip
        if fields and r.random() < 0.2:
            at = r.randrange(len(fields))
            fields[at] = (fields[at][0], mutate(r, fields[at][1], self.from_corpus))
        return {
            "connect": r.random() < 0.95,
            "host": r.choice(["mx.sender.example", "[203.0.113.9]", ""]),
            "ip": r.choice(["203.0.113.66", "192.0.2.1", "198.51.100.7", "2001:db8::1"]),
            "helo": r.choice(["mx.sender.example", "victim.example", "", "[192.0.2.1]"]),
            "mail_from": r.choice(["<a@attacker.net>", "<b@victim.example>", "<>",
                                   "<x@broken.example>", "<c@bank.example>", "<\udcff@x>"]),
            "headers": fields,
            "body": body,
            "macros": {"i": "FUZZQ", **({"{auth_authen}": "alice"} if r.random() < 0.02 else {})},
            "config": r.choice(("default", "default", "strict")),
        }  # fmt: skip


# One input taking longer than this is saved (the slowest per target and
# worker), as work a sender could make the milter do.
SLOW_SECONDS = 1.0

# Share of the inputs per target: the end-of-message path costs the most per
# input, the parsers least.
WEIGHTS = {"from": 25, "record": 15, "authres": 20, "dkim": 15, "arc": 10, "eom": 15}


@contextlib.contextmanager
def harness() -> Iterator[Harness]:
    server = TestDNSServer().start()
    server.set_zone(ZONE)
    resolver = Resolver(
        ResolverSettings(
            nameservers=(server.host,), port=server.port, query_timeout=0.5, message_budget=2.0
        )
    )
    config = Config(
        authserv_id=AUTHSERV_ID,
        dns=DNSConfig(nameservers=(server.host,), port=server.port, timeout=0.5, budget=2.0),
    )
    # "strict": every outcome acts (reject, hold, tempfail), so the reply
    # and quarantine paths run too.
    strict = replace(
        config,
        policy=PolicyConfig(
            out_of_scope="reject",
            quarantine_action="hold",
            enforce_reject=True,
            temperror_action="tempfail",
        ),
    )
    states = {
        "default": MilterState(Runtime.build(config), None),
        "strict": MilterState(Runtime.build(strict), None),
    }
    h = Harness(server, resolver, states)

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            h.errors.append(record)

    logger = logging.getLogger("dmarcmilter")
    handler = Collect(logging.ERROR)
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.ERROR)
    try:
        yield h
    finally:
        logger.removeHandler(handler)
        server.stop()


def runner(h: Harness) -> dict[str, Callable[[Any], None]]:
    return {
        "from": run_from,
        "record": run_record,
        "authres": run_authres,
        "dkim": lambda m: run_dkim(h, m),
        "arc": lambda m: run_arc(h, m),
        "eom": lambda c: run_eom(h, c),
    }


@dataclass
class Stats:
    inputs: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    crashes: dict[str, int] = field(default_factory=dict)
    slowest: dict[str, float] = field(default_factory=dict)  # one input, seconds
    saved: list[str] = field(default_factory=list)

    def merge(self, other: Stats) -> None:
        for mine, theirs in ((self.inputs, other.inputs), (self.seconds, other.seconds),
                             (self.crashes, other.crashes)):  # fmt: skip
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value  # type: ignore[assignment]
        for key, value in other.slowest.items():
            self.slowest[key] = max(self.slowest.get(key, 0.0), value)
        self.saved += other.saved


def _save(out: Path, target: str, data: Any, exc: BaseException) -> str | None:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"
    # Broken invariants are told apart by what broke (internal errors by
    # the exception behind them), other crashes by where they were raised.
    what = exc.kind if isinstance(exc, Invariant) else ""
    key = hashlib.sha1(f"{target}|{type(exc).__name__}|{where}|{what}".encode()).hexdigest()[:12]
    path = out / f"{target}-{key}.json"
    if path.exists():
        return None
    record = {
        "target": target,
        "input": data,
        "exception": f"{type(exc).__name__}: {exc}",
        "traceback": traceback.format_exception(exc),
    }
    path.write_text(json.dumps(record, indent=1))
    return str(path)


def fuzz(seed: int, count: int, seconds: float | None, targets: list[str], out: Path) -> Stats:
    """Run ``count`` inputs (or until ``seconds`` pass) spread over ``targets``."""
    inputs = Inputs(seed)
    makers: dict[str, Callable[[], Any]] = {
        "from": inputs.from_, "record": inputs.record, "authres": inputs.authres,
        "dkim": inputs.dkim, "arc": inputs.arc, "eom": inputs.eom,
    }  # fmt: skip
    schedule = [t for t in targets for _ in range(WEIGHTS[t])]
    inputs.r.shuffle(schedule)
    stats = Stats()
    deadline = None if seconds is None else time.monotonic() + seconds
    with harness() as h:
        run = runner(h)
        for n in range(count):
            if deadline is not None and n % 64 == 0 and time.monotonic() > deadline:
                break
            target = schedule[n % len(schedule)]
            data = makers[target]()
            started = time.perf_counter()
            try:
                run[target](data)
            except Exception as exc:
                stats.crashes[target] = stats.crashes.get(target, 0) + 1
                saved = _save(out, target, data, exc)
                if saved:
                    stats.saved.append(saved)
            elapsed = time.perf_counter() - started
            stats.seconds[target] = stats.seconds.get(target, 0.0) + elapsed
            stats.inputs[target] = stats.inputs.get(target, 0) + 1
            if elapsed > stats.slowest.get(target, 0.0):
                stats.slowest[target] = elapsed
                if elapsed > SLOW_SECONDS:
                    # Work a sender can make us do: kept like a crash.
                    path = out / f"slow-{target}-{seed}.json"
                    path.write_text(json.dumps({"target": target, "input": data,
                                                "seconds": elapsed}, indent=1))  # fmt: skip
                    stats.saved.append(f"{path} ({elapsed:.1f} s)")
    return stats


def _worker(args: tuple[int, int, float | None, list[str], str]) -> Stats:
    seed, count, seconds, targets, out = args
    return fuzz(seed, count, seconds, targets, Path(out))


def replay(path: Path) -> int:
    record = json.loads(path.read_text())
    with harness() as h:
        try:
            runner(h)[record["target"]](record["input"])
        except Exception:
            traceback.print_exc()
            return 1
    print(f"{path}: no crash")
    return 0


def run_atheris(target: str, argv: list[str]) -> None:
    import atheris  # optional: pip install atheris

    with harness() as h:
        run = runner(h)

        def one_input(data: bytes) -> None:
            text = data.decode("utf-8", "surrogateescape")
            if target == "from":
                run_from(text.split("\x00")[:2])
            elif target in ("record", "authres"):
                run[target](text)
            elif target == "dkim":
                run_dkim(h, _message([("DKIM-Signature", text), ("From", " a@victim.example")], ""))
            elif target == "arc":
                names = ("ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results")
                fields = list(zip(names, text.split("\x00"), strict=False))
                run_arc(h, _message([*fields, ("From", " a@victim.example")], "x\r\n"))
            else:
                values = text.split("\x00")
                fields = [("From", values[0])] + [
                    ("Authentication-Results", v) for v in values[1:3]
                ]
                fields += [("DKIM-Signature", v) for v in values[3:5]]
                run_eom(h, {"connect": True, "host": "mx.sender.example", "ip": "203.0.113.66",
                            "helo": "mx.sender.example", "mail_from": "<a@attacker.net>",
                            "headers": fields, "body": "x\r\n", "macros": {}})  # fmt: skip

        atheris.instrument_all()
        atheris.Setup([sys.argv[0], *argv], one_input)
        atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=None, help="stop early after this long")
    parser.add_argument("--out", type=Path, default=None, help="crash inputs (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--targets", default=",".join(WEIGHTS))
    parser.add_argument("--replay", type=Path, default=None, help="re-run one saved crash")
    parser.add_argument("--atheris", metavar="TARGET", choices=list(WEIGHTS), default=None)
    args, rest = parser.parse_known_args(argv)
    if args.replay is not None:
        return replay(args.replay)
    if args.atheris is not None:
        run_atheris(args.atheris, [a for a in rest if a != "--"])
        return 0
    if rest:
        parser.error(f"unknown arguments: {rest}")
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(WEIGHTS)
    if unknown:
        parser.error(f"unknown targets: {sorted(unknown)}")
    out = args.out or Path(tempfile.mkdtemp(prefix="dmarcmilter-fuzz-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"fuzzing {args.inputs} inputs over {', '.join(targets)} ({args.jobs} job(s)); "
          f"crash inputs go to {out}", flush=True)  # fmt: skip
    started = time.monotonic()
    shares = [args.inputs // args.jobs + (i < args.inputs % args.jobs) for i in range(args.jobs)]
    jobs = [(args.seed + i, n, args.seconds, targets, str(out)) for i, n in enumerate(shares)]
    total = Stats()
    if args.jobs == 1:
        total.merge(_worker(jobs[0]))
    else:
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            for stats in pool.imap_unordered(_worker, jobs):
                total.merge(stats)
    wall = time.monotonic() - started
    done = sum(total.inputs.values())
    header = f"{'target':<8} {'inputs':>9} {'busy s':>8} {'inputs/s':>10} {'max ms':>8}"
    print(f"\n{header} {'crashes':>8}")
    for target in targets:
        n, s = total.inputs.get(target, 0), total.seconds.get(target, 0.0)
        rate = n / s if s else 0.0
        slowest = total.slowest.get(target, 0.0) * 1000
        row = f"{target:<8} {n:>9} {s:>8.1f} {rate:>10.0f} {slowest:>8.1f}"
        print(f"{row} {total.crashes.get(target, 0):>8}")
    rate = done / wall if wall else 0.0
    projected = 1_000_000 / rate / 60 if rate else float("inf")
    print(f"\n{done} inputs in {wall:.1f} s wall: {rate:.0f} inputs/s; 1,000,000 would take")
    print(f"{projected:.1f} min at this rate")
    crashes = sum(total.crashes.values())
    print(f"{crashes} crash(es); {len(total.saved)} distinct (and slow inputs) saved in {out}")
    for path in total.saved:
        print(f"  {path}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
