"""Tag=value lists (RFC 6376 §3.2), as DKIM-Signature (RFC 6376 §3.5) and the
ARC-Seal and ARC-Message-Signature (RFC 8617 §4.1.2, §4.1.3) write them.

dkimpy parses the lists it verifies, strictly.  These helpers read what must
be read even from a list it refuses: the d=, s=, i= and the like of a
signature or an ARC set too broken to verify, for the A-R, the log and the
report.  They never raise.
"""

from __future__ import annotations

import re

from .domains import DomainError, normalize_domain

__all__ = ["domain_or_empty", "header_text", "loose_tags", "unfold"]

_LINE = re.compile(rb"\r?\n")
_WSP = re.compile(rb"[ \t]+")


def loose_tags(value: bytes) -> dict[bytes, bytes]:
    """Best-effort tag list: first occurrence wins, a spec without "=" or
    without a name is skipped, values are stripped of surrounding white
    space (RFC 6376 §3.2 allows FWS around every element)."""
    tags: dict[bytes, bytes] = {}
    for spec in value.split(b";"):
        name, eq, val = spec.partition(b"=")
        name = name.strip()
        if eq and name and name not in tags:
            tags[name] = val.strip()
    return tags


def unfold(value: bytes) -> bytes:
    """RFC 5322 §2.2.3 unfolding, then runs of blanks made one, as relaxed
    canonicalisation does (RFC 6376 §3.4.2), so a value reads as one line."""
    if b"\n" in value:
        value = _LINE.sub(b"", value)
    if b"\t" in value or b"  " in value:
        value = _WSP.sub(b" ", value)
    return value.strip()


def header_text(value: bytes) -> str:
    """A tag value as text.  Header bytes are ASCII or UTF-8 (RFC 6532);
    anything else is replaced, so a report can always be written."""
    return value.decode("utf-8", "replace").strip()


def domain_or_empty(value: bytes) -> str:
    """A d= (or similar) value as a normalised domain name, "" when it is not one."""
    try:
        return normalize_domain(header_text(value))
    except DomainError:
        return ""
