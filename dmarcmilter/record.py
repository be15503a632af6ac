"""DMARC Policy Record parsing.

RFC 9989 §4.5 (record location and multi-string TXT), §4.6 (the historic
``pct``/``rf``/``ri`` tags), §4.7 (tag definitions and defaults), §4.8 (formal
syntax) and §4.10.1 (what an invalid ``p``/``sp``/``np`` does).  The record
syntax is the DKIM tag-list (RFC 6376 §3.2), so a repeated tag name makes the
whole record invalid.

Parsing never raises: whatever a domain publishes ends as a
:class:`DMARCRecord` whose ``status`` says whether it can be used and whose
``problems`` say, in a few words each, what was wrong (they go into the
aggregate report ``<error>`` element and the ``check`` command's output).

The same handful of records is parsed for millions of messages, so
:func:`parse_record` is memoised on the record text.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import unquote

from .domains import DomainError, normalize_domain

_T = TypeVar("_T")


class Policy(enum.Enum):
    """Values of ``p``, ``sp`` and ``np`` (RFC 9989 §4.7)."""

    NONE = "none"
    QUARANTINE = "quarantine"
    REJECT = "reject"

    def lowered(self) -> Policy:
        """The policy one level lower, as ``t=y`` asks (RFC 9989 §4.7)."""
        if self is Policy.REJECT:
            return Policy.QUARANTINE
        return Policy.NONE


class AlignmentMode(enum.Enum):
    RELAXED = "r"
    STRICT = "s"


class PSDFlag(enum.Enum):
    YES = "y"
    NO = "n"
    UNKNOWN = "u"


class RecordStatus(enum.Enum):
    VALID = "valid"
    # Invalid p, or a present-but-invalid sp/np, with at least one valid rua
    # URI: act as if the record said p=none so reports still flow (§4.10.1).
    AS_NONE = "as_none"
    # Invalid p/sp/np without a valid rua URI, or a repeated tag: no DMARC
    # processing for the message.
    UNUSABLE = "unusable"


@dataclass(frozen=True, slots=True)
class DMARCRecord:
    raw: str
    status: RecordStatus
    p: Policy  # effective p: absent means none; AS_NONE/UNUSABLE give none
    sp: Policy | None  # valid published sp, else None
    np: Policy | None  # valid published np, else None
    adkim: AlignmentMode
    aspf: AlignmentMode
    testing: bool  # t=y, or (without a valid t) the legacy pct=0
    psd: PSDFlag
    fo: str  # normalised (lower case), default "0"
    rua: tuple[str, ...]  # valid URIs, "!size" stripped, in published order
    ruf: tuple[str, ...]
    pct: int | None  # historic; as published when valid
    problems: tuple[str, ...]
    # Syntactically valid tags that are not DMARC tags (or, under the RFC 7489
    # discovery, ``np``): ignored as §4.7 requires; kept for ``check`` output.
    unknown_tags: tuple[str, ...] = ()

    @property
    def usable(self) -> bool:
        return self.status is not RecordStatus.UNUSABLE


# WSP is SP / HTAB (RFC 5234); nothing else is stripped.
_WSP = " \t"

# The record must open with the version tag.  [impl choice, digest §1.2] the
# tag *name* may be in another case (accepted with a problem, see below); the
# value DMARC1 is case-sensitive (%s in the ABNF).  DMARC1 must be followed by
# the end, or by a separator: "v=DMARC1 p=reject" has the value
# "DMARC1 p=reject", which is not DMARC1.
_VERSION_RE = re.compile(r"[ \t]*[vV][ \t]*=[ \t]*DMARC1[ \t]*(?:;|\Z)")

_TAG_NAME_RE = re.compile(r"[A-Za-z]+\Z")

_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*\Z")
# RFC 3986 characters (unreserved, reserved, "%"), without "!" and ",",
# which a DMARC URI must percent-encode (RFC 9989 §4.7).
_URI_CHARS_RE = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@$&'()*+;=%]*\Z")
_BAD_PCT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SIZE_SUFFIX_RE = re.compile(r"![0-9]+[kmgtKMGT]?\Z")
_BAD_LOCAL_PART_RE = re.compile(r"[\x00-\x20\x7f<>]")
_RF_RE = re.compile(r"[A-Za-z][A-Za-z0-9-]*(?::[A-Za-z][A-Za-z0-9-]*)*\Z")

_POLICIES = {p.value: p for p in Policy}
_MODES = {m.value: m for m in AlignmentMode}
_PSD = {f.value: f for f in PSDFlag}
_YORN: dict[str, bool | None] = {"y": True, "n": False}
_KNOWN_TAGS = frozenset(
    ("v", "p", "sp", "np", "psd", "t", "adkim", "aspf", "fo", "rua", "ruf", "pct", "rf", "ri")
)
_KNOWN_TAGS_NO_NP = _KNOWN_TAGS - {"np"}


def is_dmarc_record(text: str) -> bool:
    """True when ``text`` begins with ``v=DMARC1`` (RFC 9989 §4.8).

    Leading WSP is tolerated [impl choice, digest §1.2]; the version value is
    case-sensitive.
    """
    return _VERSION_RE.match(text) is not None


def select_record(
    txts: Sequence[str], *, np_supported: bool = True
) -> tuple[DMARCRecord | None, int]:
    """Keep the TXT strings that are DMARC records (RFC 9989 §4.10.1 step 1).

    Returns the parsed record when exactly one is left, else None, with the
    number of DMARC records found: several at one name are all discarded.
    """
    found = [t for t in txts if is_dmarc_record(t)]
    if len(found) != 1:
        return None, len(found)
    return parse_record(found[0], np_supported=np_supported), 1


# Records longer than this are parsed every time rather than cached: the
# cache then holds at most 4096 x 2 KiB of record text, whatever records an
# attacker's domains publish (a TXT answer can be 64 KiB).
_CACHED_RECORD_CHARS = 2048


def parse_record(text: str, *, np_supported: bool = True) -> DMARCRecord:
    """Parse one DMARC record; never raises.

    ``np_supported=False`` is the RFC 7489 view used by the PSL discovery
    method, where ``np`` does not exist: it is then an unknown tag, ignored,
    and an invalid np cannot spoil the record.
    """
    if len(text) > _CACHED_RECORD_CHARS:
        return _parse_record(text, np_supported)
    return _parse_record_cached(text, np_supported)


@functools.lru_cache(maxsize=4096)
def _parse_record_cached(text: str, np_supported: bool) -> DMARCRecord:
    return _parse_record(text, np_supported)


def _parse_record(text: str, np_supported: bool) -> DMARCRecord:
    return _Parser(text, _KNOWN_TAGS if np_supported else _KNOWN_TAGS_NO_NP).parse()


class _Parser:
    def __init__(self, raw: str, known: frozenset[str]) -> None:
        self.raw = raw
        self.known = known
        self.problems: list[str] = []

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def parse(self) -> DMARCRecord:
        raw = self.raw
        if not is_dmarc_record(raw):
            self.problem("not a DMARC record: it must begin with v=DMARC1")
            return self._unusable()
        # [impl choice, digest §1.2] leading and trailing WSP is stripped;
        # the ABNF itself has no room for it.
        text = raw.strip(_WSP)
        pieces = text.split(";")
        if pieces and pieces[-1].strip(_WSP) == "":
            pieces.pop()  # a trailing ";" is allowed (dmarc-record ABNF)

        tags: dict[str, str] = {}
        unknown: list[str] = []
        duplicates: list[str] = []
        for piece in pieces:
            spec = piece.strip(_WSP)
            if not spec:
                self.problem("empty tag (';;') ignored")
                continue
            name, eq, value = spec.partition("=")
            name = name.rstrip(_WSP)
            value = value.lstrip(_WSP)
            if not eq or not _TAG_NAME_RE.match(name):
                self.problem(f"malformed tag {_show(spec)} ignored")
                continue
            lname = name.lower()
            if name != lname:
                # [impl choice, digest §1.2] RFC 6376 tag names are
                # case-sensitive; accept other case but say so.
                self.problem(f"tag name {name!r} should be lower case")
            if lname in tags:
                duplicates.append(lname)
                continue
            tags[lname] = value
            if lname not in self.known:
                unknown.append(lname)

        if duplicates:
            # RFC 9989 §4.7 uses the RFC 6376 §3.2 tag-list: a repeated tag
            # makes the whole tag-list, hence the record, invalid.
            for name in dict.fromkeys(duplicates):
                self.problem(f"duplicate tag {name}: the record is invalid")
            return self._unusable()

        adkim = self._choice(tags, "adkim", _MODES, AlignmentMode.RELAXED)
        aspf = self._choice(tags, "aspf", _MODES, AlignmentMode.RELAXED)
        psd = self._choice(tags, "psd", _PSD, PSDFlag.UNKNOWN)
        t_value = self._choice(tags, "t", _YORN, None)
        fo = self._fo(tags.get("fo"))
        rua = self._uris(tags, "rua")
        ruf = self._uris(tags, "ruf")
        pct = self._pct(tags.get("pct"))
        self._rf(tags.get("rf"))
        self._ri(tags.get("ri"))

        # [impl choice, digest §4.6] RFC 9989 maps t=y to the historic pct=0;
        # a record without a valid t and with pct=0 is therefore in testing
        # mode.  Other pct values are ignored: never sample randomly.
        testing = t_value if t_value is not None else pct == 0

        status = RecordStatus.VALID
        p: Policy | None = Policy.NONE
        sp: Policy | None = None
        np: Policy | None = None
        bad_policy = False
        if "p" in tags:
            p = _POLICIES.get(tags["p"].lower())
            if p is None:
                bad_policy = True
                self.problem(f"invalid p {_show(tags['p'])}")
        else:
            # [impl choice, digest §1.2] RFC 9989 §4.7: an absent p means
            # p=none (§4.10.1 could be read otherwise; see the digest).
            self.problem("no p tag: p=none applies")
        for name in ("sp", "np"):
            if name not in tags or name not in self.known:
                continue
            published = _POLICIES.get(tags[name].lower())
            if published is None:
                bad_policy = True
                self.problem(f"invalid {name} {_show(tags[name])}")
            elif name == "sp":
                sp = published
            else:
                np = published
        if bad_policy:
            # §4.10.1, read literally [impl choice, digest §1.2]: the record
            # as a whole acts as p=none when a valid rua exists (so reports
            # still flow), else it gets no DMARC processing.
            if rua:
                status = RecordStatus.AS_NONE
                self.problem("acting as p=none because of the invalid policy")
            else:
                status = RecordStatus.UNUSABLE
                self.problem("invalid policy and no valid rua: no DMARC processing")
            p, sp, np = Policy.NONE, None, None
        assert p is not None

        return DMARCRecord(
            raw=raw,
            status=status,
            p=p,
            sp=sp,
            np=np,
            adkim=adkim,
            aspf=aspf,
            testing=testing,
            psd=psd,
            fo=fo,
            rua=rua,
            ruf=ruf,
            pct=pct,
            problems=tuple(self.problems),
            unknown_tags=tuple(unknown),
        )

    def _unusable(self) -> DMARCRecord:
        return DMARCRecord(
            raw=self.raw,
            status=RecordStatus.UNUSABLE,
            p=Policy.NONE,
            sp=None,
            np=None,
            adkim=AlignmentMode.RELAXED,
            aspf=AlignmentMode.RELAXED,
            testing=False,
            psd=PSDFlag.UNKNOWN,
            fo="0",
            rua=(),
            ruf=(),
            pct=None,
            problems=tuple(self.problems),
        )

    def _choice(self, tags: dict[str, str], name: str, values: dict[str, _T], default: _T) -> _T:
        """A single-keyword tag; ABNF literals are case-insensitive (RFC 5234)."""
        if name not in tags:
            return default
        found = values.get(tags[name].lower())
        if found is None:
            self.problem(f"invalid {name} {_show(tags[name])} ignored")
            return default
        return found

    def _fo(self, value: str | None) -> str:
        """dmarc-fo (RFC 9989 §4.8): "0"/"1", "d", "s" joined by ":", each at
        most once, "0" and "1" not together.  The three ABNF alternatives
        allow exactly these sets in any order."""
        if value is None:
            return "0"
        items = value.lower().split(":")
        ok = (
            all(i in ("0", "1", "d", "s") for i in items)
            and len(set(items)) == len(items)
            and not ("0" in items and "1" in items)
        )
        if not ok:
            self.problem(f"invalid fo {_show(value)} ignored")
            return "0"
        return ":".join(items)

    def _uris(self, tags: dict[str, str], name: str) -> tuple[str, ...]:
        """dmarc-urilist: keep the valid URIs, drop malformed ones (§4.7)."""
        if name not in tags:
            return ()
        value = tags[name]
        if not value.strip(_WSP):
            self.problem(f"empty {name}")
            return ()
        valid: list[str] = []
        for item in value.split(","):
            uri = item.strip(_WSP)
            # The "!size" suffix is obsolete (RFC 9989 §4.8): ignore it.
            uri = _SIZE_SUFFIX_RE.sub("", uri)
            error = _uri_error(uri)
            if error:
                self.problem(f"{name}: {error} {_show(uri)} ignored")
            else:
                valid.append(uri)
        return tuple(valid)

    def _pct(self, value: str | None) -> int | None:
        # Historic (RFC 7489 §6.3): 0-100.  Parsed for the t=y mapping and
        # reported only when malformed.
        if value is None:
            return None
        if value.isascii() and value.isdigit() and len(value) <= 3 and int(value) <= 100:
            return int(value)
        self.problem(f"invalid pct {_show(value)} ignored")
        return None

    def _rf(self, value: str | None) -> None:
        # Historic (RFC 7489 §6.3): a colon-separated list of format keywords.
        if value is not None and not _RF_RE.match(value):
            self.problem(f"invalid rf {_show(value)} ignored")

    def _ri(self, value: str | None) -> None:
        # Historic (RFC 7489 §6.3): an interval in seconds.
        if value is not None and not (value.isascii() and value.isdigit()):
            self.problem(f"invalid ri {_show(value)} ignored")


def _uri_error(uri: str) -> str:
    """Why ``uri`` is not a usable dmarc-uri, or "" when it is one.

    RFC 3986 syntax with a scheme; "!" and "," must be percent-encoded.  A
    ``mailto:`` URI (RFC 6068) must name one address with a domain, since
    that is where the reports go.
    """
    if not uri:
        return "empty URI"
    scheme, colon, rest = uri.partition(":")
    if not colon or not _SCHEME_RE.match(scheme):
        return "URI without a scheme"
    if not rest:
        return "URI without a body"
    if not _URI_CHARS_RE.match(rest) or _BAD_PCT_RE.search(rest):
        return "malformed URI"
    if scheme.lower() == "mailto":
        addr = unquote(rest.partition("?")[0], errors="replace")
        local, at, domain = addr.rpartition("@")
        if not at or not local or _BAD_LOCAL_PART_RE.search(local):
            return "mailto URI without an address"
        try:
            normalize_domain(domain)
        except DomainError:
            return "mailto URI without a valid domain"
    return ""


def _show(value: str) -> str:
    """A value for a problem text: quoted, and cut short (reports must stay terse)."""
    return repr(value if len(value) <= 40 else value[:37] + "...")
