"""The Public Suffix List project's test vectors against psl_organizational_domain.

RFC 7489 §3.2 defines the Organizational Domain as the public suffix plus one
label, which is the PSL project's "registrable domain".  The vectors
(``checkPublicSuffix(input, expected)``) map onto our API like this:

* Inputs go through :func:`dmarcmilter.domains.normalize_domain` first, as
  every domain in the milter does: upper case is folded and U-labels become
  A-labels.  ``null`` and names with a leading dot (an empty label) are
  rejected there (DomainError), which is what the vectors' ``null`` expects;
  ``psl_organizational_domain`` itself only ever sees normalised names.
* An expected ``null`` for a valid name means the name is itself a public
  suffix, so it has no registrable domain.  Our function returns the name
  itself in that case (a public suffix is its own Organizational Domain), so
  ``null`` is checked as: :func:`public_suffix` gives the name itself and
  the Organizational Domain equals the input.
* Expected values are normalised the same way, so ``食狮.com.cn`` is compared
  as ``xn--85x722f.com.cn``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dmarcmilter.discovery import load_psl, psl_organizational_domain, public_suffix
from dmarcmilter.domains import DomainError, normalize_domain
from tests.conftest import shared_path

# domains.normalize_domain asks dnspython for IDNA_2008_Transitional, which
# idna >= 3.11 deprecates ("has no effect") with a DeprecationWarning that the
# test settings turn into an error.  Until domains.py switches to
# IDNA_2008_Practical (same output), tolerate exactly that warning here.

pytestmark = [pytest.mark.conformance]

_VECTOR_RE = re.compile(r"checkPublicSuffix\((null|'[^']*'), (null|'[^']*')\);")


def _vectors() -> list[tuple[str | None, str | None]]:
    """Read lazily inside the test so a missing ../shared skips, not errors."""
    path: Path = shared_path("testdata", "psl", "test_psl.txt")
    out: list[tuple[str | None, str | None]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("//"):
            continue  # comments, including the vectors the file itself disables
        match = _VECTOR_RE.fullmatch(line)
        assert match, f"unparsed vector line: {line!r}"
        out.append((_literal(match.group(1)), _literal(match.group(2))))
    return out


def _literal(token: str) -> str | None:
    return None if token == "null" else token[1:-1]


def registrable_domain(name: str | None) -> str | None:
    """The vectors' function expressed with ours (see the module docstring)."""
    if name is None:
        return None
    try:
        domain = normalize_domain(name)
    except DomainError:
        return None
    psl = load_psl(_list_path())
    od = psl_organizational_domain(domain, psl)
    if public_suffix(domain, psl) == domain:
        # A public suffix has no registrable domain; it is its own OD.
        assert od == domain
        return None
    return od


def _list_path() -> str:
    return str(shared_path("testdata", "psl", "public_suffix_list.dat"))


def test_psl_vectors() -> None:
    vectors = _vectors()
    assert len(vectors) == 78  # the 2023-02-09 snapshot; a short read must not pass
    failures = []
    for name, expected in vectors:
        want = None if expected is None else normalize_domain(expected)
        got = registrable_domain(name)
        if got != want:
            failures.append(f"{name!r}: expected {want!r}, got {got!r}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", [".com", ".example", ".example.com", ".example.example"])
def test_leading_dot_is_rejected_by_normalisation(name: str) -> None:
    with pytest.raises(DomainError):
        normalize_domain(name)
