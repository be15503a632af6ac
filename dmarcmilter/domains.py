"""Domain-name normalisation shared by every check.

RFC 9989 §3.2.10 and §4.4: domains are compared case-insensitively (RFC 4343),
in A-label form (RFC 5890 §2.3), without a trailing dot.  Every label counts,
including one-character labels such as the ``x`` of ``x.com``.
"""

from __future__ import annotations

import functools
import re

import dns.name

# RFC 1035 limits, enforced so that a hostile name never reaches a query.
MAX_NAME_OCTETS = 253
MAX_LABEL_OCTETS = 63

_LDH_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?$")


class DomainError(ValueError):
    """A string is not a usable domain name."""


# Names normalised recently, by the text given: one message asks for the
# same few names many times (discovery, alignment, SPF, DKIM).  Only texts
# that could be a domain name are kept, so the cache holds at most
# _CACHE_ENTRIES x ~300 bytes whatever senders write.
_CACHE_ENTRIES = 8192
_CACHEABLE_CHARS = MAX_NAME_OCTETS + 2


def normalize_domain(name: str) -> str:
    """Return ``name`` as a lower-case A-label domain without a trailing dot.

    Raises DomainError when the name is empty, too long, has an empty label,
    or cannot be converted to an A-label.
    """
    if len(name) <= _CACHEABLE_CHARS:
        return _normalize_cached(name)
    return _normalize(name)


def _normalize(name: str) -> str:
    text = name.strip()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise DomainError("empty domain name")
    if not text.isascii():
        try:
            # IDNA 2008 with UTS #46 mapping, as browsers and MUAs apply it.
            text = dns.name.from_unicode(text, idna_codec=dns.name.IDNA_2008_Practical).to_text(
                omit_final_dot=True
            )
        except (dns.name.NameTooLong, dns.name.LabelTooLong) as exc:
            raise DomainError(f"domain name too long: {name!r}") from exc
        except Exception as exc:  # dnspython raises several IDNA error types
            raise DomainError(f"not a valid internationalised domain name: {name!r}") from exc
    text = text.lower()
    if len(text) > MAX_NAME_OCTETS:
        raise DomainError(f"domain name too long: {name!r}")
    for label in text.split("."):
        if not label:
            raise DomainError(f"empty label in domain name: {name!r}")
        if len(label) > MAX_LABEL_OCTETS:
            raise DomainError(f"label longer than 63 octets in domain name: {name!r}")
        if not _LDH_LABEL.match(label):
            raise DomainError(f"invalid character in domain name: {name!r}")
    return text


# A DomainError is raised through the cache, never stored in it.
_normalize_cached = functools.lru_cache(maxsize=_CACHE_ENTRIES)(_normalize)


def labels(domain: str) -> list[str]:
    """The labels of an already normalised domain, leftmost first."""
    return domain.split(".")


def label_count(domain: str) -> int:
    return domain.count(".") + 1


def parent(domain: str) -> str | None:
    """The name with the leftmost label removed, or None for a single label."""
    _, sep, rest = domain.partition(".")
    return rest if sep else None


def is_subdomain(child: str, ancestor: str) -> bool:
    """True when ``child`` is strictly below ``ancestor`` (both normalised)."""
    return child.endswith("." + ancestor)


def to_unicode(domain: str) -> str:
    """U-label form of an A-label domain, for display in SMTPUTF8 contexts."""
    try:
        return dns.name.from_text(domain).to_unicode(omit_final_dot=True)
    except Exception:
        return domain


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_casefold(name: str) -> str:
    """``name`` stripped of whitespace and a trailing dot, with only ASCII
    letters lowered.  For comparing names as DNS does (RFC 4343): str.lower
    would also map, say, the Kelvin sign to "k", letting a look-alike name
    match a configured one."""
    return name.strip().rstrip(".").translate(_ASCII_LOWER)
