"""The evaluation core: envelope + message + DNS + configuration → facts.

RFC 9989 §5.3 steps 1-5.  This is the one place that lists the checks and
their order; the milter, ``dmarcmilter evaluate``, the benchmarks and the
tests all drive this same function.  It never applies policy: see
:mod:`dmarcmilter.policy`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from .arc import hop_results, trusted_hops, verify_arc
from .author import extract_author
from .config import Config
from .discovery import Discoverer, DiscoveryMethod, load_psl
from .dkim import DKIMVerifier, unverified
from .dmarc import (
    DMARCOutcome,
    aligner_for,
    evaluate_dmarc,
    evaluate_recovered,
    sealer_vouch,
)
from .errors import InputError
from .message import Message
from .resolver import DNSSession, Resolver, ResolverSettings
from .results import (
    ARCOutcome,
    AuthorResult,
    AuthorStatus,
    DKIMOutcome,
    SPFOutcome,
    SPFResult,
)
from .spf import check_spf, mail_from_domain

LIST_HEADERS = ("list-id", "list-post")


@dataclass(frozen=True, slots=True)
class Envelope:
    """The SMTP envelope (RFC 5321): who connected and what they said."""

    client_ip: str
    helo: str
    mail_from: str  # without angle brackets; "" for the null reverse-path
    rcpt_to: tuple[str, ...] = ()
    queue_id: str = ""

    @classmethod
    def create(
        cls,
        client_ip: str,
        helo: str,
        mail_from: str,
        rcpt_to: tuple[str, ...] | list[str] = (),
        queue_id: str = "",
    ) -> Envelope:
        """Validate and normalise user-supplied envelope values."""
        try:
            ip = ipaddress.ip_address(client_ip.strip())
        except ValueError:
            raise InputError(f"invalid client IP address: {client_ip!r}") from None
        mail_from = mail_from.strip()
        if mail_from.startswith("<") and mail_from.endswith(">"):
            mail_from = mail_from[1:-1]
        return cls(str(ip), helo.strip(), mail_from, tuple(rcpt_to), queue_id)


@dataclass(frozen=True, slots=True)
class Evaluation:
    """Everything the Authentication-Results header, the history row and the
    aggregate report need to know about one message."""

    envelope: Envelope
    author: AuthorResult
    spf: SPFOutcome
    dkim: DKIMOutcome
    arc: ARCOutcome
    dmarc: DMARCOutcome
    evaluated_at: dt.datetime
    # List-Id (RFC 2919) or List-Post (RFC 2369) present: mailing-list mail,
    # which local policy may treat more gently (RFC 9989 §7.4).
    mailing_list: bool = False
    # A trusted ARC sealer (policy.trusted_arc_sealers) of the newest hops
    # whose recorded results show an aligned pass for a failing message:
    # local policy may honour it (RFC 8617 §7.2).  See dmarc.sealer_vouch.
    arc_vouch: str | None = None


@dataclass(frozen=True, slots=True)
class UpstreamResults:
    """SPF and DKIM results an upstream host we trust already recorded in
    Authentication-Results (RFC 8601 §5); a check it did not record is run
    here.  See :mod:`dmarcmilter.upstream`."""

    authserv_id: str
    spf: SPFOutcome | None = None
    dkim: DKIMOutcome | None = None


def evaluate(
    envelope: Envelope,
    message: Message,
    session: DNSSession,
    config: Config,
    *,
    now: dt.datetime | None = None,
    upstream: UpstreamResults | None = None,
    body_cut_at: int | None = None,
) -> Evaluation:
    """Run every check on one message, in the order RFC 9989 §5.3 needs.

    ``upstream`` supplies results to use instead of checking; ``body_cut_at``
    says the body was longer than the bytes kept (the milter's limit), so
    DKIM cannot be verified and each signature is a permerror.
    """
    evaluated_at = now or dt.datetime.now(dt.UTC)
    method = DiscoveryMethod(config.dmarc.discovery_method)
    psl = load_psl(config.dmarc.psl_file or None) if method is DiscoveryMethod.PSL else None

    # The order of the lookups is a security property.  The message's DNS
    # budget (dns.budget) is spent first on what the DMARC result needs and
    # an attacker cannot choose, and only then on names the attacker picked
    # (a DKIM d= or MAIL FROM of his own, ARC sealers, the HELO name): those
    # may time out, one per-query timeout each, and must not starve the
    # author's policy.  A lookup past the budget gives temperror for its own
    # check only, which then shows in Authentication-Results; it cannot
    # change the DMARC result, as dmarc.could_align rules those names out.
    #
    # 1. The Author Domain (§4.2) decides whether DMARC can apply at all;
    #    then its policy discovery and Organizational Domain walk.
    #    An out-of-scope From that still names domains a reader would show
    #    is evaluated for each of them (policy.out_of_scope = "evaluate"):
    #    each is an Author Domain whose policy comes first.
    author = extract_author(message.headers)
    discoverer = Discoverer(session, method, psl)
    recover = config.policy.out_of_scope == "evaluate"
    authors: tuple[AuthorResult, ...] = (author,)
    if recover and not author.status.in_scope:
        authors = tuple(AuthorResult(AuthorStatus.OK, domain=d) for d in author.recovered)
    aligners = [a for a in (aligner_for(each, discoverer) for each in authors) if a is not None]
    mfrom_domain = mail_from_domain(envelope.helo, envelope.mail_from)
    spf_matters = any(a.spf_could_align(mfrom_domain) for a in aligners)

    def dkim_matters(domain: str) -> bool:
        return any(a.dkim_could_align(domain) for a in aligners)

    # 2. SPF on a MAIL FROM that could align, and DKIM signatures whose d=
    #    could align (the first ones verified: max_signatures counts them first).
    spf: SPFOutcome | None = None
    mfrom: SPFResult | None = None
    if upstream is not None and upstream.spf is not None:
        spf = upstream.spf
    elif spf_matters:
        mfrom = check_spf(
            session, envelope.client_ip, envelope.helo, envelope.mail_from, check_helo=False
        ).mfrom
    verifier: DKIMVerifier | None = None
    dkim: DKIMOutcome | None = None
    if upstream is not None and upstream.dkim is not None:
        dkim = upstream.dkim
    elif body_cut_at is not None:
        dkim = unverified(message.raw, f"body larger than {body_cut_at} bytes was not verified")
    else:
        verifier = DKIMVerifier(
            message.raw,
            max_signatures=config.dkim.max_signatures,
            min_key_bits=config.dkim.min_key_bits,
        )
        verifier.verify(session, dkim_matters)
    # 3. The Organizational Domain walks of those identifiers (§4.4).
    early = verifier.outcome() if verifier is not None else dkim
    for aligner in aligners:
        aligner.settle(
            spf.mfrom if spf is not None else mfrom,
            early.signatures if early is not None else (),
        )
    # 4. What DMARC does not need, with the budget left: ARC (for local
    #    policy's trusted forwarders), SPF on a MAIL FROM that cannot align
    #    and on HELO, then the other DKIM signatures.
    arc = verify_arc(message.raw, session)
    if spf is None:
        spf = check_spf(
            session,
            envelope.client_ip,
            envelope.helo,
            envelope.mail_from,
            check_helo=config.spf.check_helo,
            mfrom=mfrom,
        )
    if verifier is not None:
        verifier.verify(session)
        dkim = verifier.outcome()
    assert dkim is not None
    # 5. The DMARC result: every answer it needs is memoised by now.
    dmarc = (evaluate_recovered if recover else evaluate_dmarc)(author, spf, dkim, discoverer)
    # Local policy's trusted forwarders: what their newest hops vouched for,
    # judged by the same alignment rule (dmarc.sealer_vouch).
    hops = trusted_hops(arc, config.policy.trusted_arc_sealers)
    vouch = sealer_vouch(dmarc, tuple((h.sealer_domain, hop_results(h)) for h in hops), discoverer)
    mailing_list = any(name.lower() in LIST_HEADERS for name, _ in message.headers)
    return Evaluation(envelope, author, spf, dkim, arc, dmarc, evaluated_at, mailing_list, vouch)


def resolver_from_config(config: Config) -> Resolver:
    dns = config.dns
    return Resolver(
        ResolverSettings(
            nameservers=dns.nameservers,
            port=dns.port,
            query_timeout=dns.timeout,
            message_budget=dns.budget,
            cache_entries=dns.cache_entries,
            cache_bytes=dns.cache_bytes,
        )
    )
