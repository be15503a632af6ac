"""Result shapes shared by the checks (SPF, DKIM, ARC, Author Domain).

Every check returns one frozen dataclass from here; DMARC (``dmarc.py``) reads
them and never queries DNS for SPF or DKIM again.  Result codes are the RFC
8601 §2.7 vocabulary, so rendering an Authentication-Results header or an RFC
9990 ``auth_results`` element is a plain ``.value``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class SPFResultCode(enum.Enum):
    """RFC 7208 §2.6 results, spelled as in RFC 8601 §2.7.2."""

    NONE = "none"
    NEUTRAL = "neutral"
    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


class SPFScope(enum.Enum):
    MFROM = "mfrom"
    HELO = "helo"


@dataclass(frozen=True, slots=True)
class SPFResult:
    """One SPF evaluation (RFC 7208 §4).

    ``domain`` is the domain whose policy was checked: the MAIL FROM domain,
    or the HELO name for the HELO identity and for a null reverse-path
    (RFC 7208 §2.4: the identity is then postmaster@HELO).
    """

    result: SPFResultCode
    domain: str
    scope: SPFScope
    reason: str = ""
    # The identity as checked, e.g. "user@example.com" or "postmaster@helo.example".
    identity: str = ""
    # The SPF TXT record of ``domain`` as evaluated (RFC 6652 SPF-DNS in a
    # failure report), cut at spf.MAX_RECORD_CHARS; "" when none was found.
    # Not compared: it is what was seen, not part of the result.
    record: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class SPFOutcome:
    """Both SPF identities.  DMARC uses ``mfrom`` only (RFC 9989 §4.4)."""

    mfrom: SPFResult
    helo: SPFResult | None = None
    null_reverse_path: bool = False


class DKIMResultCode(enum.Enum):
    """RFC 8601 §2.7.1."""

    NONE = "none"
    PASS = "pass"
    FAIL = "fail"
    POLICY = "policy"
    NEUTRAL = "neutral"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


@dataclass(frozen=True, slots=True)
class DKIMSignatureResult:
    """The verification of one DKIM-Signature field (RFC 6376 §6)."""

    domain: str  # d=, normalised; "" when the tag is missing or unusable
    selector: str  # s=
    result: DKIMResultCode
    reason: str = ""  # human-readable, e.g. "body hash mismatch"
    algorithm: str = ""  # a=
    identity: str = ""  # i=
    header_b: str = ""  # the first characters of b=, RFC 6008 header.b
    # Left unverified at a limit of ours (the body past milter.max_body_bytes,
    # signatures past dkim.max_signatures): recorded as permerror, but the
    # signer did nothing wrong, so it is never reported as a failed
    # verification (fo=d).
    unverified: bool = False


@dataclass(frozen=True, slots=True)
class DKIMOutcome:
    """Every DKIM-Signature of the message, in header order (top first)."""

    signatures: tuple[DKIMSignatureResult, ...] = ()

    @property
    def passing_domains(self) -> tuple[str, ...]:
        return tuple(s.domain for s in self.signatures if s.result is DKIMResultCode.PASS)


class ARCResultCode(enum.Enum):
    """RFC 8617 §4.4 chain validation status (cv=), as A-R ``arc=``."""

    NONE = "none"
    PASS = "pass"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class ARCHop:
    """One ARC set (RFC 8617 §4.1)."""

    instance: int
    sealer_domain: str  # ARC-Seal d=
    sealer_selector: str  # ARC-Seal s=
    cv: str  # the cv= the sealer recorded: none, pass or fail
    ams_domain: str  # ARC-Message-Signature d=
    # ARC-Authentication-Results payload after "i=N;": the sealer's own
    # authserv-id and results, e.g. "mx.example; dkim=pass ...; dmarc=pass ..."
    authentication_results: str


@dataclass(frozen=True, slots=True)
class ARCOutcome:
    result: ARCResultCode = ARCResultCode.NONE
    reason: str = ""
    hops: tuple[ARCHop, ...] = ()  # by instance, lowest first

    @property
    def sealing_domains(self) -> tuple[str, ...]:
        return tuple(h.sealer_domain for h in self.hops)

    @property
    def last_hop(self) -> ARCHop | None:
        return self.hops[-1] if self.hops else None


class AuthorStatus(enum.Enum):
    """Whether the RFC5322.From yields exactly one Author Domain (RFC 9989 §4.2)."""

    OK = "ok"
    NO_FROM = "no_from"
    MULTIPLE_FROM = "multiple_from"
    MULTIPLE_DOMAINS = "multiple_domains"
    NO_DOMAIN = "no_domain"  # unparseable, or group syntax without an address

    @property
    def in_scope(self) -> bool:
        return self is AuthorStatus.OK


@dataclass(frozen=True, slots=True)
class AuthorResult:
    status: AuthorStatus
    domain: str | None = None  # A-label, lower case, no trailing dot
    addresses: tuple[str, ...] = ()  # every address found, as written
    reason: str = ""
    # Out of scope only: the domains a lenient mail reader would still show
    # as the author (RFC 9989 §11.5), A-labels, and whether the search for
    # them stopped at a bound before the end (see author.recover_domains).
    recovered: tuple[str, ...] = ()
    recovery_incomplete: bool = False
