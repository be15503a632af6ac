"""The OpenSPF RFC 7208 test suite (../shared/testdata/spf/rfc7208-tests.yml)
run through check_spf against the loopback DNS server.

Each scenario's zone data is served by a real authoritative server and queried
through our resolver, exactly as in production; only the suite's own data
conventions (those of the pyspf test driver it ships with) are translated:

* ``SPF`` entries are published as type SPF, and also as TXT unless the name
  has a ``TXT`` entry of its own (RFC 7208 dropped the SPF type; the "Selecting
  records" scenario checks that type SPF is ignored).
* ``TXT: NONE`` publishes nothing; it only stops that copying.
* ``TIMEOUT`` makes the name go unanswered for every type it has no record of.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from dnslib import DNSLabel, DNSRecord

from dmarcmilter.resolver import Resolver, ResolverSettings
from dmarcmilter.spf import check_spf
from tests.conftest import SHARED, shared_path
from tests.dnsserver import TestDNSServer

SUITE_PARTS = ("testdata", "spf", "rfc7208-tests.yml")


class SuiteDNSServer(TestDNSServer):
    """The test server plus the suite's per-type TIMEOUT: a name marked
    TIMEOUT still answers for the types it has records of ("spftimeout")."""

    __test__ = False

    def __init__(self) -> None:
        super().__init__()
        self._answering: dict[str, frozenset[str]] = {}
        self.loaded: int | None = None

    def load(self, zonedata: Mapping[str, Any]) -> None:
        self.set_zone({})
        answering: dict[str, frozenset[str]] = {}
        for name, entries in zonedata.items():
            # The server matches names in dnslib's presentation form, where a
            # space in a label (the macro-mania scenario) reads "\032".
            owner = str(DNSLabel(name)).rstrip(".").lower()
            has_txt = any(isinstance(e, dict) and "TXT" in e for e in entries)
            types: set[str] = set()
            timeout = False
            for entry in entries:
                if entry == "TIMEOUT":
                    timeout = True
                    continue
                ((rtype, value),) = entry.items()
                if value == "NONE":
                    continue
                if rtype in ("TXT", "SPF") and value == []:
                    # "Null text": TXT rdata without any character-string is
                    # malformed (RFC 1035 §3.3.14) and dnspython rejects the
                    # whole response; one empty string is its nearest form.
                    value = [""]
                if rtype == "MX":
                    value = tuple(value)
                self.add(owner, rtype, value)
                types.add(rtype)
                if rtype == "SPF" and not has_txt:
                    self.add(owner, "TXT", value)
                    types.add("TXT")
            if timeout:
                answering[owner] = frozenset(types)
        self._answering = answering

    def _fill(self, reply: DNSRecord, qname: str, qtype: str, depth: int) -> DNSRecord | None:
        answering = self._answering.get(qname)
        if answering is not None and qtype not in answering:
            return None
        return super()._fill(reply, qname, qtype, depth)


@dataclass(frozen=True)
class Case:
    scenario: int
    zonedata: Mapping[str, Any]
    helo: str
    host: str
    mailfrom: str
    results: tuple[str, ...]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _cases() -> Iterator[Any]:
    path = SHARED.joinpath(*SUITE_PARTS)
    if not path.exists():
        # The test body reports the absence (skip, or fail in CI).
        yield pytest.param(None, id="rfc7208-suite-missing")
        return
    with path.open(encoding="utf-8") as fh:
        scenarios = list(yaml.safe_load_all(fh))
    for index, scenario in enumerate(scenarios):
        prefix = _slug(scenario["description"])
        for name, test in scenario["tests"].items():
            result = test["result"]
            case = Case(
                scenario=index,
                zonedata=scenario["zonedata"],
                helo=test["helo"],
                host=test["host"],
                mailfrom=test["mailfrom"],
                results=(result,) if isinstance(result, str) else tuple(result),
            )
            yield pytest.param(case, id=f"{prefix}/{name}")


@pytest.fixture(scope="module")
def suite_server() -> Iterator[SuiteDNSServer]:
    server = SuiteDNSServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def resolvers() -> dict[int, Resolver]:
    return {}


@pytest.mark.conformance
@pytest.mark.parametrize("case", list(_cases()))
def test_rfc7208(
    case: Case | None, suite_server: SuiteDNSServer, resolvers: dict[int, Resolver]
) -> None:
    shared_path(*SUITE_PARTS)
    assert case is not None
    if suite_server.loaded != case.scenario:
        suite_server.load(case.zonedata)
        suite_server.loaded = case.scenario
        # A fresh cache per scenario load, since the zone data changed.
        resolvers[case.scenario] = Resolver(
            ResolverSettings(
                nameservers=(suite_server.host,),
                port=suite_server.port,
                query_timeout=0.3,
                message_budget=5.0,
            )
        )
    outcome = check_spf(resolvers[case.scenario].session(), case.host, case.helo, case.mailfrom)
    mfrom = outcome.mfrom
    assert mfrom.result.value in case.results, f"{mfrom.result.value}: {mfrom.reason}"
    assert outcome.null_reverse_path == (not case.mailfrom)
    if outcome.null_reverse_path and outcome.helo is not None:
        assert outcome.helo.result is mfrom.result
