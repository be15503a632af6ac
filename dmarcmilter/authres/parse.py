"""Authentication-Results parsing (RFC 8601 §2.2), for reading the fields
other hosts wrote.  (:mod:`dmarcmilter.authres.render` writes ours.)

Three uses, and what each needs:

* RFC 8601 §5: an MTA MUST delete (or rename) fields that carry its own
  authserv-id before it adds its own, or a sender could forge our verdict.
  :func:`authserv_id_of` finds the authserv-id of any value, even one whose
  results do not parse, so a malformed forgery cannot slip through.
* Trusting an upstream host (an internal relay) that already checked SPF and
  DKIM: :func:`parse` gives its results, methods, reasons and properties.
* Reading the ARC-Authentication-Results payload of a trusted sealer (RFC
  8617 §4.1.1: the text after ``i=N;`` has the same ``authserv-id; results``
  syntax): the same :func:`parse`.

The grammar is the RFC 8601 §2.2 ABNF, with CFWS (nested comments, quoted
pairs, folding) from RFC 5322 §3.2.2, ``value`` (token or quoted-string)
from RFC 2045 §5.1, and UTF-8 allowed in values (RFC 6532 §3.2, RFC 8601
§2.2).  Keywords (method, result, ptype, property) are case-insensitive and
returned in lower case; values keep their case.

Real fields deviate from the ABNF in harmless ways, which are accepted:

* unquoted property values containing tspecials: base64 ``header.b=`` values
  with ``/``, ``+`` and ``=``, IPv6 addresses with ``:``, ``<>``;
* no CFWS between the elements of a result (``dkim=pass(ok)header.d=x``);
* empty results: a trailing ``;`` or ``;;``;
* properties without a ptype (Microsoft's ``action=none``, authentication_
  milter's ``x-bits=2048``), kept under their bare name, and ``reason``
  written after the properties;
* an empty property value (``header.d=;``);
* no authserv-id at all, the field starting with a result (Exchange Online
  writes ``spf=pass (...) smtp.mailfrom=...; dkim=...``): the authserv-id is
  then ``""``, which matches no configured id;
* only an authserv-id, without ``; none``.

Everything else is refused with :class:`AuthResSyntaxError`: a field that
cannot be read unambiguously is no basis for trusting anything.  Every
string returned is free of ASCII control characters (except HTAB) and of lone
surrogates, so it can be logged and encoded.  The work is one linear pass,
without recursion, bounded by :data:`MAX_VALUE_OCTETS` and
:data:`MAX_RESULTS`.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Set
from dataclasses import dataclass

from ..domains import DomainError, normalize_domain
from ..errors import InputError

__all__ = [
    "MAX_AUTHSERV_ID_CHARS",
    "MAX_RESULTS",
    "MAX_VALUE_OCTETS",
    "AuthResSyntaxError",
    "AuthResults",
    "ResInfo",
    "authserv_id_key",
    "authserv_id_of",
    "claims_authserv_id",
    "domain_part",
    "parse",
    "same_authserv_id",
    "same_domain",
]

# An honest field is well under 2 KiB; these bound the work a hostile one
# can cause.
MAX_VALUE_OCTETS = 64 * 1024
MAX_RESULTS = 256
# An authserv-id longer than this is never compared: when stripping, it
# counts as claiming one of ours (see claims_authserv_id); it is never
# trusted.  Ours are host names, and no domain name is longer (RFC 1035
# §3.1: 255 octets).  It also bounds the normalisation work per field.
MAX_AUTHSERV_ID_CHARS = 255
# More digits than any version will have; also keeps int() far from
# Python's limit on converting long digit strings.
_MAX_VERSION_DIGITS = 9

# RFC 5322 §2.2.3: unfolding removes a line break followed by WSP.  The
# milter hands over folds with a bare LF; a lone CR is treated alike.  A line
# break that is not a fold (invalid in a header field) counts as a space, so
# that no value ever contains one.
_FOLD = re.compile(r"(?:\r\n|\r|\n)(?=[ \t])")
_BREAK = re.compile(r"[\r\n]")
_WSP = re.compile(r"[ \t]+")
# RFC 2045 token: any CHAR except SPACE, CTLs and tspecials; non-ASCII
# characters are accepted (RFC 6532), lone surrogates (bytes that were not
# UTF-8, decoded with surrogateescape) are not.
_TOKEN = re.compile(r'[^\x00-\x20\x7f()<>@,;:\\"/\[\]?=\ud800-\udfff]+')
# RFC 5321 Keyword is Ldh-str; "_" is accepted as some x- extensions use it.
_KEYWORD = re.compile(r"[A-Za-z0-9_-]+")
_DIGITS = re.compile(r"[0-9]+")
# A property value as real fields write it: a token that may also contain
# the tspecials "/", "=", ":", "@", "<", ">", "?", ",", "[", "]" (base64,
# addresses, IPv6).  What still ends it: WSP, ";", comments, quotes.
_VALUE = re.compile(r'[^\x00-\x20\x7f;()"\\\ud800-\udfff]+')
# RFC 5322 qtext plus WSP (FWS is allowed inside a quoted-string), plus
# non-ASCII; no controls, no surrogates.
_QTEXT = re.compile(r'[^"\\\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]+')
# Inside a comment anything but the delimiters is skipped unexamined: the
# text is discarded.
_CTEXT = re.compile(r"[^()\\]+")

_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


class AuthResSyntaxError(InputError):
    """An Authentication-Results value that cannot be parsed."""


@dataclass(frozen=True, slots=True)
class ResInfo:
    """One ``resinfo`` (RFC 8601 §2.2): ``method=result reason=... ptype.property=value ...``."""

    method: str  # lower case, without its "/version"
    result: str  # lower case
    reason: str | None = None
    # ("ptype.property", value) in field order, names in lower case; a
    # property written without a ptype is kept under its bare name.
    properties: tuple[tuple[str, str], ...] = ()

    def get(self, name: str) -> str | None:
        """The first value of property ``name`` (e.g. ``"smtp.mailfrom"``), or None."""
        key = name.translate(_ASCII_LOWER)
        for prop, value in self.properties:
            if prop == key:
                return value
        return None


@dataclass(frozen=True, slots=True)
class AuthResults:
    """One parsed Authentication-Results value."""

    # "" when the field names none (see the module docstring).
    authserv_id: str
    # RFC 8601 §2.2: 1 is the only version defined, and absent means 1.  A
    # field of another version has unknown semantics: do not trust it.
    version: int | None = None
    results: tuple[ResInfo, ...] = ()  # empty for "none"

    def by_method(self, method: str) -> tuple[ResInfo, ...]:
        """The results of ``method`` (case-insensitive), in field order."""
        key = method.translate(_ASCII_LOWER)
        return tuple(r for r in self.results if r.method == key)


def parse(value: str) -> AuthResults:
    """Parse an Authentication-Results field value (the text after the colon).

    Raises :class:`AuthResSyntaxError`, and nothing else, for any input that
    cannot be read.
    """
    _check_size(value)
    scanner = _Scanner(_unfold(value))
    authserv_id = _read_authserv_id(scanner)
    version: int | None = None
    if authserv_id is not None:
        scanner.skip_cfws()
        digits = scanner.match(_DIGITS)
        if digits is not None:
            if len(digits) > _MAX_VERSION_DIGITS or scanner.peek() not in ("", " ", "\t", "(", ";"):
                raise AuthResSyntaxError("malformed authres-version")
            version = int(digits)
            scanner.skip_cfws()
        if not scanner.at_end() and scanner.peek() != ";":
            raise AuthResSyntaxError(
                f"expected ';' after the authserv-id, found {_show(scanner.peek())}"
            )
    results: list[ResInfo] = []
    # Without an authserv-id the first result is not preceded by ";".
    need_separator = authserv_id is not None
    while True:
        scanner.skip_cfws()
        if need_separator:
            if scanner.at_end():
                break
            if scanner.peek() != ";":
                raise AuthResSyntaxError(
                    f"expected ';' between results, found {_show(scanner.peek())}"
                )
            scanner.pos += 1
            scanner.skip_cfws()
        need_separator = True
        if scanner.at_end() or scanner.peek() == ";":
            continue  # an empty result: a trailing or doubled ";"
        res = _read_resinfo(scanner)
        if res is not None:
            results.append(res)
            if len(results) > MAX_RESULTS:
                raise AuthResSyntaxError(f"more than {MAX_RESULTS} results")
    return AuthResults(authserv_id or "", version, tuple(results))


def authserv_id_of(value: str) -> str | None:
    """The authserv-id of a field value, or None when it names none.

    Only the start of the value is read, so this works on values whose
    results :func:`parse` refuses (RFC 8601 §5: forged fields must go however
    malformed they are).  Whenever :func:`parse` succeeds, its
    ``authserv_id`` is this (``""`` for None).  Never raises.
    """
    try:
        return _read_authserv_id(_Scanner(_unfold(value))) or None
    except AuthResSyntaxError:
        return None


def same_authserv_id(a: str, b: str) -> bool:
    """Whether two authserv-ids are the same, strictly: case-insensitive in
    ASCII only, trailing dots ignored.  An empty id is nobody's.

    This is the comparison for *trusting* an id.  Full Unicode folding would
    make e.g. the Kelvin sign match "k", letting a field a relay did not
    recognise as its own pass here as the relay's.  Deciding whether a field
    claims *our* id is the opposite question: see :func:`claims_authserv_id`.
    """
    key_a = a.strip(" \t").rstrip(".").translate(_ASCII_LOWER)
    key_b = b.strip(" \t").rstrip(".").translate(_ASCII_LOWER)
    return bool(key_a) and key_a == key_b


def authserv_id_key(authserv_id: str) -> str:
    """``authserv_id`` reduced to what a consumer reading it could take it
    for, so that every spelling that may be read as one of our ids has the
    same key as that id.  For stripping (RFC 8601 §5), where matching too
    much costs a foreign field and matching too little lets a forgery of our
    verdict through; never for trusting.

    The reductions are those of the consumers that matter: Unicode case
    folding and NFKC (the Kelvin sign is "k", fullwidth letters and digits
    are ASCII), the IDNA (UTS #46) mapping (label separators U+3002, U+FF0E,
    U+FF61 are dots; soft hyphen, zero-width joiners and other format
    characters and variation selectors are removed), A-labels decoded to
    U-labels ("xn--" is the same name as its Unicode form), surrounding
    white space and trailing dots dropped.  Call it on ids no longer than
    :data:`MAX_AUTHSERV_ID_CHARS` (see :func:`claims_authserv_id`).
    """
    return _decode_a_labels(_folded_key(authserv_id))


def claims_authserv_id(authserv_id: str, own_keys: Set[str]) -> bool:
    """Whether a field with ``authserv_id`` claims one of ours: its
    :func:`authserv_id_key` is in ``own_keys`` (keys made by that same
    function).  An id over :data:`MAX_AUTHSERV_ID_CHARS` is not examined and
    counts as ours: padding (say, with soft hyphens a consumer ignores) must
    not carry a forgery past the comparison; an honest id is never that long.

    A-labels in ``authserv_id`` are decoded only when one of our keys has a
    U-label: a valid A-label never decodes to plain ASCII (RFC 5891 §5.4),
    so without one the decoding could not make a match, and an attacker's
    "xn--" labels cost nothing.
    """
    if len(authserv_id) > MAX_AUTHSERV_ID_CHARS:
        return True
    key = _folded_key(authserv_id)
    if not key:
        return False
    if key in own_keys:
        return True
    if "xn--" in key and not all(own.isascii() for own in own_keys):
        return _decode_a_labels(key) in own_keys
    return False


def _folded_key(authserv_id: str) -> str:
    return _fold(authserv_id).strip().rstrip(".").strip()


def _decode_a_labels(key: str) -> str:
    if "xn--" not in key:
        return key
    return ".".join(_fold(_from_a_label(label)) for label in key.split("."))


def trusted_id_key(authserv_id: str) -> str | None:
    """The key under which an authserv-id may be *trusted*: exact ASCII,
    case-insensitive and without a trailing dot, as DNS names compare (RFC
    4343), nothing else mapped (as :func:`same_authserv_id`).  None for an
    id that cannot be a trusted one: empty, over
    :data:`MAX_AUTHSERV_ID_CHARS`, or holding anything but printable ASCII."""
    if not authserv_id or len(authserv_id) > MAX_AUTHSERV_ID_CHARS:
        return None
    if not all("!" <= char <= "~" for char in authserv_id):
        return None
    return authserv_id.rstrip(".").translate(_ASCII_LOWER) or None


# UTS #46 maps these to the label separator "." (after NFKC, U+FF0E is "."
# and U+FF61 is U+3002).
_IDEOGRAPHIC_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
# A-labels are at most 63 octets (RFC 5890 §2.3.2.1); decoding is only tried
# on labels this short, so a hostile label costs nothing.
_MAX_A_LABEL = 63


def _fold(text: str) -> str:
    """NFKC case fold, then the characters IDNA maps to nothing removed."""
    if text.isascii():
        # NFKC leaves ASCII alone, and case folding it is lower-casing.
        return text.lower()
    text = unicodedata.normalize("NFKC", text.translate(_IDEOGRAPHIC_DOTS))
    text = unicodedata.normalize("NFKC", text.casefold()).translate(_IDEOGRAPHIC_DOTS)
    if not text.isascii():
        text = "".join(char for char in text if not _ignored(char))
    return text


def _ignored(char: str) -> bool:
    # Format characters (soft hyphen, ZWJ, ZWNJ, word joiner, BOM, bidi
    # marks), variation selectors, the combining grapheme joiner and the
    # Mongolian free variation selectors: UTS #46 maps (or IDNA ignores)
    # these, and a reader does not see them.
    return (
        unicodedata.category(char) == "Cf"
        or "\ufe00" <= char <= "\ufe0f"
        or "\U000e0100" <= char <= "\U000e01ef"
        or char in "\u034f\u180b\u180c\u180d\u180f"
    )


def _from_a_label(label: str) -> str:
    if not label.startswith("xn--") or len(label) > _MAX_A_LABEL:
        return label
    try:
        return label[4:].encode("ascii").decode("punycode")
    except (UnicodeError, ValueError):
        return label


def domain_part(pvalue: str) -> str:
    """The domain of a property value that may be a domain or an address:
    ``smtp.mailfrom=user@example.com``, ``header.i=@example.com``,
    ``header.d=example.com`` all give ``example.com``."""
    text = pvalue.strip(" \t")
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    return text.rpartition("@")[2]


def same_domain(a: str, b: str) -> bool:
    """Whether two domain names are the same, compared as everywhere else in
    dmarcmilter (A-labels, case-insensitive, no trailing dot: RFC 9989
    §4.4).  A value that is not a domain name matches nothing."""
    try:
        return normalize_domain(a) == normalize_domain(b)
    except DomainError:
        return False


# -- the scanner -----------------------------------------------------------------------------


class _Scanner:
    """A position in the unfolded value, and the lexical pieces."""

    __slots__ = ("pos", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        """The next character, or "" at the end."""
        return self.text[self.pos : self.pos + 1]

    def match(self, pattern: re.Pattern[str]) -> str | None:
        found = pattern.match(self.text, self.pos)
        if found is None:
            return None
        self.pos = found.end()
        return found.group()

    def skip_cfws(self) -> None:
        """RFC 5322 §3.2.2 CFWS; comments nest, and are read without
        recursion so that depth costs nothing."""
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char in " \t":
                self.match(_WSP)
            elif char == "(":
                self._skip_comment()
            else:
                return

    def _skip_comment(self) -> None:
        text = self.text
        pos = self.pos
        depth = 0
        while pos < len(text):
            char = text[pos]
            if char == "(":
                depth += 1
                pos += 1
            elif char == ")":
                depth -= 1
                pos += 1
                if depth == 0:
                    self.pos = pos
                    return
            elif char == "\\":
                pos += 2  # quoted-pair: the next character is literal
            else:
                found = _CTEXT.match(text, pos)
                assert found is not None  # char is none of "()\\"
                pos = found.end()
        raise AuthResSyntaxError("unterminated comment")

    def quoted_string(self) -> str:
        """The content of the quoted-string at the position, unescaped."""
        text = self.text
        pos = self.pos + 1  # the opening quote
        parts: list[str] = []
        while True:
            found = _QTEXT.match(text, pos)
            if found is not None:
                parts.append(found.group())
                pos = found.end()
            char = text[pos : pos + 1]
            if char == '"':
                self.pos = pos + 1
                return "".join(parts)
            if not char:
                raise AuthResSyntaxError("unterminated quoted-string")
            if char == "\\":
                escaped = text[pos + 1 : pos + 2]
                if not escaped:
                    raise AuthResSyntaxError("unterminated quoted-string")
                if escaped not in ('"', "\\") and _QTEXT.fullmatch(escaped) is None:
                    raise AuthResSyntaxError(f"{_show(escaped)} in a quoted-string")
                parts.append(escaped)
                pos += 2
                continue
            raise AuthResSyntaxError(f"{_show(char)} in a quoted-string")


def _check_size(value: str) -> None:
    # Characters first: cheap, and a str over the limit in characters is
    # over it in octets too.  Lone surrogates count 3 octets, one too many
    # for the byte they stand for: harmless at this size.
    too_long = len(value) > MAX_VALUE_OCTETS or (
        len(value) > MAX_VALUE_OCTETS // 4
        and len(value.encode("utf-8", "surrogatepass")) > MAX_VALUE_OCTETS
    )
    if too_long:
        raise AuthResSyntaxError(f"value longer than {MAX_VALUE_OCTETS} octets")


def _unfold(value: str) -> str:
    if "\n" in value or "\r" in value:
        value = _BREAK.sub(" ", _FOLD.sub("", value))
    return value


def _read_authserv_id(scanner: _Scanner) -> str | None:
    """The authserv-id at the start of the value; None when the value starts
    with a result instead (no authserv-id); the scanner is then left at it."""
    scanner.skip_cfws()
    if scanner.peek() == '"':
        return scanner.quoted_string()
    start = scanner.pos
    token = scanner.match(_TOKEN)
    if token is None:
        found = scanner.peek()
        raise AuthResSyntaxError("no authserv-id" + (f", found {_show(found)}" if found else ""))
    if _KEYWORD.fullmatch(token) and _starts_methodspec(scanner):
        # A dotless token followed by "=" (or "/version =") is a method: the
        # field has no authserv-id.  A name with a dot never reads as one.
        scanner.pos = start
        return None
    return token


def _starts_methodspec(scanner: _Scanner) -> bool:
    """Whether a method's "=" or "/ version =" follows (CFWS allowed)."""
    saved = scanner.pos
    try:
        scanner.skip_cfws()
        if scanner.peek() == "/":
            scanner.pos += 1
            scanner.skip_cfws()
            if scanner.match(_DIGITS) is None:
                return False
            scanner.skip_cfws()
        return scanner.peek() == "="
    except AuthResSyntaxError:
        return False
    finally:
        scanner.pos = saved


def _read_resinfo(scanner: _Scanner) -> ResInfo | None:
    """One resinfo after its ";" and CFWS; None for the ``none`` of a field
    reporting no results."""
    method = scanner.match(_KEYWORD)
    if method is None:
        raise AuthResSyntaxError(f"expected a method, found {_show(scanner.peek())}")
    method = method.lower()
    scanner.skip_cfws()
    versioned = scanner.peek() == "/"
    if versioned:
        # method-version: checked, then dropped; only version 1 exists.
        scanner.pos += 1
        scanner.skip_cfws()
        if scanner.match(_DIGITS) is None:
            raise AuthResSyntaxError(f"malformed version of method {method!r}")
        scanner.skip_cfws()
    if scanner.peek() != "=":
        if method == "none" and not versioned and scanner.peek() in ("", ";"):
            return None  # RFC 8601 no-result
        raise AuthResSyntaxError(f"expected '=' after method {method!r}")
    scanner.pos += 1
    scanner.skip_cfws()
    result = scanner.match(_KEYWORD)
    if result is None:
        raise AuthResSyntaxError(f"expected a result for method {method!r}")
    reason: str | None = None
    properties: list[tuple[str, str]] = []
    while True:
        scanner.skip_cfws()
        if scanner.at_end() or scanner.peek() == ";":
            break
        name = _read_property_name(scanner)
        if scanner.peek() != "=":
            raise AuthResSyntaxError(f"expected '=' after {name!r}")
        scanner.pos += 1
        pvalue = _read_pvalue(scanner)
        if name == "reason":
            # RFC 8601 puts reason before the properties; some write it
            # after.  The first one counts.
            if reason is None:
                reason = pvalue
        else:
            properties.append((name, pvalue))
    return ResInfo(method, result.lower(), reason, tuple(properties))


def _read_property_name(scanner: _Scanner) -> str:
    """``ptype "." property`` with CFWS allowed around the dot, lower case;
    also a bare keyword (``reason``, or a property without a ptype)."""
    parts: list[str] = []
    while True:
        part = scanner.match(_KEYWORD)
        if part is None:
            found = scanner.peek()
            what = "a property name" if parts else "a property"
            raise AuthResSyntaxError(f"expected {what}, found {_show(found)}")
        parts.append(part.lower())
        scanner.skip_cfws()
        if scanner.peek() != ".":
            return ".".join(parts)
        scanner.pos += 1
        scanner.skip_cfws()


def _read_pvalue(scanner: _Scanner) -> str:
    """RFC 8601 pvalue (also used for the reason's value), after the "="."""
    scanner.skip_cfws()
    char = scanner.peek()
    if char in ("", ";"):
        return ""  # lenient: an empty value
    if char == '"':
        start = scanner.pos
        content = scanner.quoted_string()
        if scanner.peek() != "@":
            return content
        # A quoted local-part: '"john doe"@example.com', kept as written
        # so that it stays an address.
        scanner.pos += 1
        scanner.match(_VALUE)
        return scanner.text[start : scanner.pos]
    found = scanner.match(_VALUE)
    if found is None:
        raise AuthResSyntaxError(f"expected a value, found {_show(char)}")
    return found


def _show(char: str) -> str:
    if not char:
        return "the end"
    if "\ud800" <= char <= "\udfff":
        return "a byte that is not UTF-8"
    return repr(char)
