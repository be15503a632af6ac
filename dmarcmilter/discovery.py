"""DMARC policy discovery and Organizational Domain determination.

RFC 9989 §4.10 (the DNS Tree Walk), §4.10.1 (which record supplies the
policy; ``sp``/``np``; the non-existence test of RFC 8020), §4.10.2 (the
Organizational Domain) and §5.3.6 (a failed lookup gives temperror).  The
RFC 7489 method (§6.6.3 policy discovery, §3.2 Organizational Domain from a
Public Suffix List) is kept as :attr:`DiscoveryMethod.PSL` for receivers that
must reproduce RFC 7489 results.

One :class:`Discoverer` serves one message.  It memoises every ``_dmarc``
answer, every walk and every existence check, because a message can need a
policy walk plus one Organizational Domain walk per identifier (RFC 9989
§4.4), and those walks share most of their names.
"""

from __future__ import annotations

import enum
import threading
import weakref
from dataclasses import dataclass, replace

from publicsuffix2 import PublicSuffixList

from .domains import DomainError, is_subdomain, label_count, normalize_domain
from .errors import ConfigError
from .record import DMARCRecord, Policy, PSDFlag, RecordStatus, select_record
from .resolver import DNSSession, DNSStatus

# RFC 9989 §4.10: a walk queries the start name and at most seven ancestors;
# a name of eight or more labels jumps straight to its seven-label suffix.
MAX_WALK_LABELS = 7


class DiscoveryMethod(enum.Enum):
    TREEWALK = "treewalk"  # RFC 9989 §4.10
    PSL = "psl"  # RFC 7489 §6.6.3 with a Public Suffix List


class DiscoveryStatus(enum.Enum):
    FOUND = "found"  # a record applies; requested_policy is set
    NONE = "none"  # no record: DMARC does not apply (§5.3.2)
    TEMPERROR = "temperror"  # a needed query failed (§5.3.6)
    PERMERROR = "permerror"  # the record that applies is unusable (§4.10.1)


@dataclass(frozen=True, slots=True)
class PolicyDiscovery:
    """The outcome of policy discovery for one Author Domain.

    ``organizational_domain`` is set when discovery settled it: always after
    a tree walk, and when the Author Domain's own record carries a ``psd``
    tag.  When the Author Domain's own record applies without a psd tag the
    discovery stops there (§4.10.1) and the field is None; ask
    :meth:`Discoverer.organizational_domain`, which reuses the memoised answer.

    On TEMPERROR ``record`` and ``requested_policy`` are None (no policy may
    be applied, §5.3.6); ``detail`` names the failed query.
    """

    author_domain: str
    method: DiscoveryMethod
    status: DiscoveryStatus
    record: DMARCRecord | None = None
    policy_domain: str | None = None
    organizational_domain: str | None = None
    policy_tag: str | None = None
    requested_policy: Policy | None = None
    author_domain_exists: bool | None = None
    from_psd: bool = False
    detail: str = ""


@dataclass(frozen=True, slots=True)
class OrgDomainResult:
    domain: str | None  # None only on temperror
    temperror: bool = False
    detail: str = ""


# -- Public Suffix List ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _PSLRules:
    exact: frozenset[str]
    wildcard_parents: frozenset[str]  # "*.kobe.jp" is stored as "kobe.jp"
    exceptions: frozenset[str]  # "!city.kobe.jp" is stored as "city.kobe.jp"


_psl_lock = threading.Lock()
_psl_by_path: dict[str | None, PublicSuffixList] = {}
_rules_by_psl: weakref.WeakKeyDictionary[PublicSuffixList, _PSLRules] = weakref.WeakKeyDictionary()


def load_psl(path: str | None = None) -> PublicSuffixList:
    """Load a Public Suffix List file (None: the list bundled with
    publicsuffix2), once per path.

    Both the ICANN and the private sections are used, as RFC 7489 §3.2 names
    the list without excluding either; this is where the two discovery
    methods diverge for ``blogspot.com``-style suffixes (digest §2.6).
    """
    with _psl_lock:
        psl = _psl_by_path.get(path)
        if psl is not None:
            return psl
        shown = path if path is not None else "bundled with publicsuffix2"
        try:
            psl = PublicSuffixList(path)
        except (OSError, UnicodeError, ValueError) as exc:
            raise ConfigError(f"cannot read the public suffix list {shown}: {exc}") from exc
        rules = _compile_rules(psl)
        if not rules.exact and not rules.wildcard_parents:
            # An empty or wrong file would silently make every name its own
            # public suffix's child; refuse it at start-up instead.
            raise ConfigError(f"the public suffix list {shown} holds no rules")
        _rules_by_psl[psl] = rules
        _psl_by_path[path] = psl
        return psl


def _compile_rules(psl: PublicSuffixList) -> _PSLRules:
    exact: set[str] = set()
    wild: set[str] = set()
    exceptions: set[str] = set()
    # publicsuffix2 keeps every rule line (already IDNA-encoded) in ``tlds``.
    # Its own lookup is not used: it treats interior names of a longer rule
    # (``amazonaws.com`` for ``s3.amazonaws.com``) as public suffixes.
    for line in psl.tlds:
        words = str(line).split()
        rule = words[0].lower().strip(".") if words else ""
        if not rule:
            continue
        if rule.startswith("!"):
            exceptions.add(rule[1:])
        elif rule.startswith("*."):
            wild.add(rule[2:])
        else:
            exact.add(rule)
    return _PSLRules(frozenset(exact), frozenset(wild), frozenset(exceptions))


def _rules(psl: PublicSuffixList) -> _PSLRules:
    rules = _rules_by_psl.get(psl)
    if rules is None:
        rules = _compile_rules(psl)
        with _psl_lock:
            _rules_by_psl[psl] = rules
    return rules


def public_suffix(domain: str, psl: PublicSuffixList) -> str:
    """The public suffix of a normalised domain, by the publicsuffix.org
    algorithm: an exception rule wins, else the matching rule with the most
    labels, else the implicit ``*`` rule (the last label)."""
    rules = _rules(psl)
    suffixes = _suffixes(domain)  # longest first
    for i, name in enumerate(suffixes):
        if name in rules.exceptions:
            return suffixes[i + 1] if i + 1 < len(suffixes) else name
    for i, name in enumerate(suffixes):
        if name in rules.exact:
            return name
        if i + 1 < len(suffixes) and suffixes[i + 1] in rules.wildcard_parents:
            return name
    return suffixes[-1]


def psl_organizational_domain(domain: str, psl: PublicSuffixList) -> str:
    """RFC 7489 §3.2: the public suffix plus one label.

    ``domain`` must already be normalised (domains.normalize_domain).  A
    domain that is itself a public suffix is its own Organizational Domain.
    """
    suffix = public_suffix(domain, psl)
    if suffix == domain:
        return domain
    # The suffix is a proper suffix: take one more label from the domain.
    head = domain[: -len(suffix) - 1]
    return head.rsplit(".", 1)[-1] + "." + suffix


def _suffixes(domain: str) -> list[str]:
    """``a.b.c`` → ``["a.b.c", "b.c", "c"]``."""
    out = [domain]
    pos = domain.find(".")
    while pos != -1:
        out.append(domain[pos + 1 :])
        pos = domain.find(".", pos + 1)
    return out


# -- The DNS Tree Walk -------------------------------------------------------


def _temperror(
    author: str, method: DiscoveryMethod, detail: str, od: str | None = None
) -> PolicyDiscovery:
    """§5.3.6: a query discovery needed failed, so no policy can apply."""
    return PolicyDiscovery(
        author, method, DiscoveryStatus.TEMPERROR, organizational_domain=od, detail=detail
    )


def walk_names(start: str) -> list[str]:
    """The names a tree walk from ``start`` looks at, in order (§4.10).

    The start itself, then, if it has eight or more labels, its seven-label
    suffix (an eight-label name's parent is that suffix anyway), then one
    label fewer each step down to the TLD.  Never the root.
    """
    names = _suffixes(start)
    count = len(names)
    if count > MAX_WALK_LABELS + 1:
        # names[i] has count - i labels; keep the start and the suffixes of
        # at most seven labels.
        return [start, *names[count - MAX_WALK_LABELS :]]
    return names


@dataclass(frozen=True, slots=True)
class _Lookup:
    """The ``_dmarc`` TXT answer at one name, already filtered (§4.10 step 1)."""

    record: DMARCRecord | None
    count: int  # v=DMARC1 records found; more than one means "no record"
    failed: bool = False
    detail: str = ""


@dataclass(frozen=True, slots=True)
class _Walk:
    """A finished tree walk and the Organizational Domain it gives (§4.10.2)."""

    start: str
    found: tuple[tuple[str, DMARCRecord], ...] = ()  # longest name first
    organizational_domain: str | None = None
    psd_name: str | None = None  # set when the OD came from a psd=y record (rule 2)
    failed: bool = False
    detail: str = ""


class Discoverer:
    """Per-message discovery with memoised _dmarc lookups and OD walks (a message may need
    1 + #DKIM d= + 1 walks)."""

    def __init__(
        self,
        session: DNSSession,
        method: DiscoveryMethod = DiscoveryMethod.TREEWALK,
        psl: PublicSuffixList | None = None,
    ) -> None:
        self.session = session
        self.method = method
        if method is DiscoveryMethod.PSL and psl is None:
            psl = load_psl()
        self.psl = psl
        self._lookups: dict[str, _Lookup] = {}
        self._walks: dict[str, _Walk] = {}
        self._exists: dict[str, tuple[bool | None, str]] = {}
        self._od: dict[str, OrgDomainResult] = {}
        self._policies: dict[str, PolicyDiscovery] = {}

    # -- public API ---------------------------------------------------------

    def discover_policy(self, author_domain: str) -> PolicyDiscovery:
        """Find the DMARC policy that applies to ``author_domain`` (§4.10.1)."""
        try:
            domain = normalize_domain(author_domain)
        except DomainError as exc:
            # A string that is not a domain name cannot have a record.
            return PolicyDiscovery(
                author_domain, self.method, DiscoveryStatus.NONE, detail=str(exc)
            )
        known = self._policies.get(domain)
        if known is None:
            if self.method is DiscoveryMethod.PSL:
                known = self._discover_psl(domain)
            else:
                known = self._discover_treewalk(domain)
            self._policies[domain] = known
        return known

    def organizational_domain(self, domain: str) -> OrgDomainResult:
        """The Organizational Domain of ``domain`` (§4.10.2, or RFC 7489 §3.2
        in PSL mode)."""
        try:
            name = normalize_domain(domain)
        except DomainError as exc:
            # No walk can be made; the name is its own (unique) OD, so it
            # aligns with nothing but itself.
            return OrgDomainResult(domain.strip().lower(), detail=str(exc))
        known = self._od.get(name)
        if known is None:
            if self.method is DiscoveryMethod.PSL:
                assert self.psl is not None
                known = OrgDomainResult(psl_organizational_domain(name, self.psl))
            else:
                walk = self._walk(name)
                if walk.failed:
                    known = OrgDomainResult(None, temperror=True, detail=walk.detail)
                else:
                    known = OrgDomainResult(walk.organizational_domain)
            self._od[name] = known
        return known

    # -- RFC 9989 ------------------------------------------------------------

    def _discover_treewalk(self, author: str) -> PolicyDiscovery:
        method = DiscoveryMethod.TREEWALK
        own = self._lookup(author)
        if own.failed:
            return _temperror(author, method, own.detail)
        if own.record is not None:
            # §4.10.1: the Author Domain's own record is the policy record
            # and p applies.  A psd tag on it settles the OD without a walk
            # (psd=n: rule 1; psd=y at the start: rule 3).
            record = own.record
            od = author if record.psd is not PSDFlag.UNKNOWN else None
            return self._apply(author, record, author, od, from_psd=False, subdomain=False)

        walk = self._walk(author)
        if walk.failed:
            return _temperror(author, method, walk.detail)
        od = walk.organizational_domain
        assert od is not None
        records = dict(walk.found)
        od_record = records.get(od)
        if od_record is None and od not in walk_names(author):
            # The OD is one label below a psd=y record but was skipped by the
            # jump to seven labels (it has eight).  Whether it has a record
            # of its own decides between its policy and the PSD's, so look.
            # [impl choice: the spec is silent; one extra query, outside the
            # eight of the walk, only in this corner case]
            extra = self._lookup(od)
            if extra.failed:
                return _temperror(author, method, extra.detail, od)
            od_record = extra.record
        if od_record is not None:
            # The OD's own record; a PSD policy above it is never used.
            return self._apply(author, od_record, od, od, from_psd=False, subdomain=author != od)
        if walk.psd_name is not None:
            psd_record = records[walk.psd_name]
            return self._apply(author, psd_record, walk.psd_name, od, from_psd=True, subdomain=True)
        return PolicyDiscovery(
            author,
            method,
            DiscoveryStatus.NONE,
            organizational_domain=od,
            detail="no DMARC record",
        )

    def _apply(
        self,
        author: str,
        record: DMARCRecord,
        policy_domain: str,
        od: str | None,
        *,
        from_psd: bool,
        subdomain: bool,
    ) -> PolicyDiscovery:
        """Pick the tag that gives the requested policy (§4.10.1)."""
        base = PolicyDiscovery(
            author,
            self.method,
            DiscoveryStatus.FOUND,
            record=record,
            policy_domain=policy_domain,
            organizational_domain=od,
            from_psd=from_psd,
        )
        if record.status is RecordStatus.UNUSABLE:
            return replace(
                base,
                status=DiscoveryStatus.PERMERROR,
                detail=f"unusable DMARC record at _dmarc.{policy_domain}",
            )
        if record.status is RecordStatus.AS_NONE:
            return replace(
                base,
                policy_tag="p",
                requested_policy=Policy.NONE,
                detail="invalid policy in the record: acting as p=none",
            )
        if not subdomain:
            return replace(base, policy_tag="p", requested_policy=record.p)
        exists: bool | None = None
        if record.np is not None:
            # §4.10.1 and RFC 8020: np applies when the Author Domain does not
            # exist.  The check is made whenever np is published, even if np
            # equals the sp/p fallback, so that policy_tag is always truthful.
            # Without np both paths give the same tag (np falls back to sp,
            # then p), so no query is needed.  (In PSL mode np is never set.)
            exists, detail = self._author_exists(author)
            if exists is None:
                # §5.3.6: a query DMARC needs failed; no policy applies.
                return replace(base, status=DiscoveryStatus.TEMPERROR, record=None, detail=detail)
            if not exists:
                return replace(
                    base, policy_tag="np", requested_policy=record.np, author_domain_exists=False
                )
        if record.sp is not None:
            return replace(
                base, policy_tag="sp", requested_policy=record.sp, author_domain_exists=exists
            )
        return replace(base, policy_tag="p", requested_policy=record.p, author_domain_exists=exists)

    def _walk(self, start: str) -> _Walk:
        """The generic tree walk of §4.10 and the OD rules of §4.10.2."""
        known = self._walks.get(start)
        if known is not None:
            return known
        found: list[tuple[str, DMARCRecord]] = []
        stop: DMARCRecord | None = None
        for name in walk_names(start):
            look = self._lookup(name)
            if look.failed:
                # Any unanswered name could have held the record that decides
                # the OD (a psd tag, or the shortest record), so the walk
                # cannot finish (§5.3.6).
                walk = _Walk(start, failed=True, detail=look.detail)
                self._walks[start] = walk
                return walk
            if look.record is not None:
                found.append((name, look.record))
                if look.record.psd is not PSDFlag.UNKNOWN:
                    stop = look.record
                    break
        od = start
        psd_name: str | None = None
        if found:
            last_name, last = found[-1]
            od = last_name  # rule 1 (psd=n) and rule 3 (fewest labels)
            if stop is not None and last.psd is PSDFlag.YES and last_name != start:
                # Rule 2: one label below the PSD on the path to the start.
                psd_name = last_name
                od = _suffixes(start)[label_count(start) - label_count(last_name) - 1]
        walk = _Walk(start, tuple(found), od, psd_name)
        self._walks[start] = walk
        return walk

    def _lookup(self, name: str) -> _Lookup:
        """TXT at ``_dmarc.<name>``, filtered and memoised."""
        known = self._lookups.get(name)
        if known is not None:
            return known
        qname = "_dmarc." + name
        answer = self.session.query(qname, "TXT")
        if answer.status.is_failure:
            suffix = f": {answer.detail}" if answer.detail else ""
            look = _Lookup(None, 0, True, f"{qname} TXT {answer.status.value}{suffix}")
        elif answer.status is DNSStatus.NOERROR:
            # [impl choice, digest §2.1] a lone v=DMARC1 record counts as "a
            # record" for the walk whatever its tag errors; they are dealt
            # with when the record is applied (PERMERROR or act as p=none).
            record, count = select_record(
                answer.txt(), np_supported=self.method is DiscoveryMethod.TREEWALK
            )
            look = _Lookup(record, count)
        else:
            look = _Lookup(None, 0)
        self._lookups[name] = look
        return look

    def _author_exists(self, author: str) -> tuple[bool | None, str]:
        """RFC 9989 §4.10.1 with RFC 8020: NXDOMAIN on the Author Domain
        itself (not its ``_dmarc`` name) means it does not exist; any other
        answer means it does; a failure leaves it unknown (None)."""
        known = self._exists.get(author)
        if known is None:
            answer = self.session.query(author, "A")
            if answer.status.is_failure:
                suffix = f": {answer.detail}" if answer.detail else ""
                known = (None, f"{author} A {answer.status.value}{suffix}")
            else:
                known = (answer.status is not DNSStatus.NXDOMAIN, "")
            self._exists[author] = known
        return known

    # -- RFC 7489 --------------------------------------------------------------

    def _discover_psl(self, author: str) -> PolicyDiscovery:
        """RFC 7489 §6.6.3: the Author Domain's set, and only if that set is
        empty the OD's.  No psd and no np: neither exists in RFC 7489, so np
        is parsed as an unknown tag and ignored."""
        method = DiscoveryMethod.PSL
        assert self.psl is not None
        od = psl_organizational_domain(author, self.psl)
        self._od.setdefault(author, OrgDomainResult(od))
        own = self._lookup(author)
        if own.failed:
            return _temperror(author, method, own.detail, od)
        if own.count > 1:
            # Unlike RFC 9989, several records end discovery: no DMARC.
            return PolicyDiscovery(
                author,
                method,
                DiscoveryStatus.NONE,
                organizational_domain=od,
                detail=f"{own.count} DMARC records at _dmarc.{author}",
            )
        if own.record is not None:
            return self._apply(author, own.record, author, od, from_psd=False, subdomain=False)
        if od == author:
            return PolicyDiscovery(
                author,
                method,
                DiscoveryStatus.NONE,
                organizational_domain=od,
                detail="no DMARC record",
            )
        at_od = self._lookup(od)
        if at_od.failed:
            return _temperror(author, method, at_od.detail, od)
        if at_od.record is None:
            detail = (
                f"{at_od.count} DMARC records at _dmarc.{od}" if at_od.count else "no DMARC record"
            )
            return PolicyDiscovery(
                author, method, DiscoveryStatus.NONE, organizational_domain=od, detail=detail
            )
        # The author is a subdomain of the OD: sp, else p (RFC 7489 §6.3).
        return self._apply(
            author, at_od.record, od, od, from_psd=False, subdomain=is_subdomain(author, od)
        )
