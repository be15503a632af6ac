"""Author Domain extraction from the RFC5322.From field (RFC 9989 §4.2, §11.5).

The Author Domain is the domain of the address in the From field; DMARC
applies only when the field yields exactly one domain (RFC 9989 §4.2).  The
field is an RFC 5322 §3.6.2 mailbox-list, parsed here with the §3.4 address
grammar including group syntax, the §4.4 obsolete forms (routes, CFWS around
dots, empty list elements) and the RFC 6532 §3.2 UTF-8 extensions.  Display
names and the Sender field are ignored (RFC 9989 Appendix A.3, §11.4).  U-label
domains become A-labels (RFC 5890 §2.3) through
:func:`dmarcmilter.domains.normalize_domain`.

Why a tokenizer of our own rather than the standard library:

* ``email.utils.getaddresses`` misparses the obsolete route form, and before
  the CVE-2023-27043 fix it split on an ``@`` inside a quoted display name.
* ``email.headerregistry`` reaches the right address for most well-formed
  fields, but it silently drops what it cannot parse: ``<a@x.example>
  <b@y.example>`` yields only x.example, although a mail reader may show
  y.example.  Its recursive comment parser raises RecursionError on deeply
  nested comments, it returns domain literals and U-labels unchanged, and it
  is about ten times slower than the parser below.

A field that is out of scope is not the end of the matter: a reader still
shows the address in ``CEO <ceo@bank.example> (`` or in the second of two
From fields.  :func:`recover_domains` collects those domains, so that the
DMARC step can evaluate each as the Author Domain and apply the strictest
result (RFC 9989 §11.5, digest §4.1) instead of delivering the message as if
no domain were named.

The parser below is one linear pass over a token list, with no recursion.  It
tolerates the damage common in real mail (an unquoted comma in a display
name, a missing comma or closing ``>``, a group without ``;``), and in every
tolerated case it counts each address a reader could take as an author: an
unquoted ``user@x.example`` in a display name counts like a second address.
An ``@`` inside a comment, quoted string or RFC 2047 encoded word never
supplies an address.  Work is bounded by :data:`MAX_FIELD_CHARS` and
:data:`MAX_ADDRESSES`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .domains import DomainError, normalize_domain
from .results import AuthorResult, AuthorStatus

log = logging.getLogger(__name__)

# Beyond these the field is not evaluated: an honest From is a few hundred
# characters with one address, and the limits bound the work per message.
MAX_FIELD_CHARS = 16384
MAX_ADDRESSES = 100
# Recovery from an out-of-scope From (RFC 9989 §11.5 asks for a cap).  Past
# any of these the recovered list is marked incomplete, which the DMARC step
# treats as a failure under the strictest policy found (fail closed):
# distinct domains kept; From fields read (when there are more, the first
# and the last halves are read, as readers show the first or the last);
# characters read over all fields (a longer field is read up to the cap).
MAX_RECOVERED_DOMAINS = 5
MAX_RECOVERY_FIELDS = 10
MAX_RECOVERY_CHARS = 65536
# Domains named in a reason; the reason ends up in a header field.
_MAX_LISTED = 5
_MAX_SHOWN = 64

# RFC 5322 §2.2.3: unfolding removes a CRLF that is followed by WSP.  The
# milter hands over folds with a bare LF.
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_WSP = re.compile(r"[ \t\r\n]+")
# atext plus ".", plus everything that is not ASCII (RFC 6532 §3.2) and any
# other character that is not structural, so that odd characters stay inside
# the token and are rejected later by domain normalisation instead of
# silently splitting a domain in two.
_ATOM = re.compile(r'[^ \t\r\n"(),:;<>@\[\]\\]+')
# RFC 2047 §2 encoded-word: kept as one opaque token even when its encoded
# text holds an "@" or ".", so that it can never supply an address.  Encoded
# text containing structural characters is not accepted as an encoded word:
# then the field is read as a plain parser would read it.
_ENCODED_WORD = re.compile(
    r'=\?[^ \t\r\n()<>@,;:"/\[\]?.=\\]+\?[BbQq]\?[^ \t\r\n?()<>,;:"\[\]\\]*\?='
)
_QUOTED = re.compile(r'"[^"\\]*(?:\\[\s\S][^"\\]*)*"')
_LITERAL = re.compile(r"\[[^\[\]\\]*(?:\\[\s\S][^\[\]\\]*)*\]")
_COMMENT_STOP = re.compile(r"[()\\]")
# An angle address anywhere in the text, for a field whose comment or quoted
# string never ends: a reader may show the swallowed rest as it is.
_LOOSE_ANGLE_ADDR = re.compile(r'<[^<>@\s"(),;:\\]*@([^<>\s"(),;:\\\[\]]+)>')

# Token kinds.  The structural specials stand for themselves.
_ATOM_T = "a"
_QUOTED_T = "q"
_LITERAL_T = "l"
_JUNK_T = "x"  # a stray ")", "]" or "\\"
_WORDS = frozenset((_ATOM_T, _QUOTED_T))
# What an obs-route ("@a.example,@b.example:") may contain.
_ROUTE = frozenset(("@", ",", _ATOM_T, _LITERAL_T))
# Tokens that end a display name or an address list element.
_BOUNDARY = frozenset("<:,;>")


def extract_author(headers: Sequence[tuple[str, str]]) -> AuthorResult:
    """The Author Domain of a message from its header fields, in order.

    ``headers`` are (name, value) pairs with values as received (folded,
    possibly raw UTF-8).  Only fields named From count.  Never raises.
    """
    values = [value for name, value in headers if name.strip(" \t").lower() == "from"]
    if not values:
        return AuthorResult(AuthorStatus.NO_FROM, reason="no From field")
    if len(values) > 1:
        result = AuthorResult(
            AuthorStatus.MULTIPLE_FROM, reason=f"{len(values)} From fields, exactly one is allowed"
        )
    else:
        try:
            result = parse_from(values[0])
        except Exception:
            # A parser bug must not take the message down with it: report the
            # field as unusable, which keeps the message out of DMARC's scope.
            log.exception("failed to parse a From field")
            result = AuthorResult(AuthorStatus.NO_DOMAIN, reason="unparsable From field")
    if result.status.in_scope:
        return result
    try:
        recovered, incomplete = recover_domains(values)
    except Exception:
        log.exception("failed to recover domains from a From field")
        return result
    return dataclasses.replace(result, recovered=recovered, recovery_incomplete=incomplete)


def recover_domains(values: Sequence[str]) -> tuple[tuple[str, ...], bool]:
    """The domains a lenient mail reader would show as the author of a
    message whose From fields are out of DMARC's scope, and whether a bound
    stopped the search early.

    Every From field counts.  An address counts where the parser finds one:
    in angle brackets or written bare, including the addresses it already
    tolerates in damaged fields; in a field with an unterminated comment or
    quoted string, an angle address in the swallowed rest counts too.  An
    ``@`` in a complete comment, quoted string or encoded word still never
    supplies an address, as for an in-scope field (display names are not
    the Author Domain, RFC 9989 Appendix A.3).  Domain literals and names
    that are not valid domains are skipped.  Work is bounded by
    :data:`MAX_RECOVERY_FIELDS`, :data:`MAX_RECOVERY_CHARS` and
    :data:`MAX_RECOVERED_DOMAINS`.
    """
    incomplete = False
    fields = list(values)
    if len(fields) > MAX_RECOVERY_FIELDS:
        half = MAX_RECOVERY_FIELDS // 2
        fields = fields[:half] + fields[-half:]
        incomplete = True
    domains: list[str] = []
    budget = MAX_RECOVERY_CHARS
    for value in fields:
        limit = min(MAX_FIELD_CHARS, budget)
        if len(value) > limit:
            value = value[:limit]
            incomplete = True
        budget -= len(value)
        if "\n" in value:
            value = _FOLD.sub("", value)
        tokens, lex_error = _tokenize(value)
        parser = _Parser(tokens)
        parser.parse()
        incomplete = incomplete or parser.truncated
        found = [m.domain for m in parser.mailboxes if m.domain and not m.literal]
        if lex_error.startswith("unterminated"):
            found.extend(_LOOSE_ANGLE_ADDR.findall(value))
        for name in found:
            try:
                domain = normalize_domain(name)
            except DomainError:
                continue
            if domain in domains:
                continue
            if len(domains) >= MAX_RECOVERED_DOMAINS:
                return tuple(domains), True
            domains.append(domain)
        if budget <= 0:
            return tuple(domains), True
    return tuple(domains), incomplete


def parse_from(value: str) -> AuthorResult:
    """The Author Domain of one From field value (see :func:`extract_author`)."""
    if len(value) > MAX_FIELD_CHARS:
        return AuthorResult(
            AuthorStatus.NO_DOMAIN, reason=f"From field longer than {MAX_FIELD_CHARS} characters"
        )
    if "\n" in value:
        value = _FOLD.sub("", value)
    tokens, lex_error = _tokenize(value)
    parser = _Parser(tokens)
    parser.parse()
    if lex_error and not parser.errors:
        parser.errors.append(lex_error)
    return _decide(parser, blank=not tokens and not lex_error and not value.strip(" \t\r\n"))


@dataclass(slots=True)
class _Mailbox:
    address: str  # local-part "@" domain as written, route dropped
    domain: str  # as written; "" when missing
    literal: bool  # the domain is a domain literal such as [192.0.2.1]


class _TooMany(Exception):
    """Raised inside the parser once MAX_ADDRESSES have been collected."""


def _tokenize(text: str) -> tuple[list[tuple[str, str]], str]:
    """Split ``text`` into (kind, text) tokens; comments and whitespace are
    dropped (RFC 5322 §3.2.2 CFWS).  Returns the tokens and the first lexical
    error, or "" when there was none."""
    tokens: list[tuple[str, str]] = []
    error = ""
    pos = 0
    end = len(text)
    while pos < end:
        char = text[pos]
        if char in " \t\r\n":
            match = _WSP.match(text, pos)
            pos = match.end() if match else pos + 1
        elif char in "<>@,;:":
            tokens.append((char, char))
            pos += 1
        elif char == '"':
            match = _QUOTED.match(text, pos)
            if match is None:
                # Unterminated: the rest of the field is the quoted string.
                error = error or "unterminated quoted string"
                tokens.append((_QUOTED_T, text[pos:]))
                break
            tokens.append((_QUOTED_T, match.group()))
            pos = match.end()
        elif char == "(":
            pos, closed = _skip_comment(text, pos)
            if not closed:
                error = error or "unterminated comment"
        elif char == "[":
            match = _LITERAL.match(text, pos)
            if match is None:
                error = error or "unterminated domain literal"
                tokens.append((_LITERAL_T, text[pos:]))
                break
            tokens.append((_LITERAL_T, match.group()))
            pos = match.end()
        elif char in ")]\\":
            tokens.append((_JUNK_T, char))
            pos += 1
        else:
            start = pos
            if char == "=":
                word = _ENCODED_WORD.match(text, pos)
                if word is not None:
                    pos = word.end()
            match = _ATOM.match(text, pos)
            if match is not None:
                pos = match.end()
            tokens.append((_ATOM_T, text[start:pos]))
    return tokens, error


def _skip_comment(text: str, pos: int) -> tuple[int, bool]:
    """Skip the comment opening at ``pos``; comments nest (RFC 5322 §3.2.2).
    Returns the position after it and whether it was closed."""
    depth = 0
    while True:
        match = _COMMENT_STOP.search(text, pos)
        if match is None:
            return len(text), False
        char = match.group()
        pos = match.end()
        if char == "\\":
            pos += 1  # quoted-pair: the next character is literal
        elif char == "(":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return pos, True


def _dot_joined(left: tuple[str, str], right: tuple[str, str]) -> bool:
    # obs-local-part and obs-domain allow CFWS around the dots, so
    # "first . last" arrives as two tokens that belong together.
    return (left[0] == _ATOM_T and left[1].endswith(".")) or (
        right[0] == _ATOM_T and right[1].startswith(".")
    )


class _Parser:
    """RFC 5322 §3.4 address-list over the token list, without recursion."""

    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.mailboxes: list[_Mailbox] = []
        self.errors: list[str] = []
        self.groups = 0
        self.truncated = False

    def parse(self) -> None:
        try:
            self._list()
        except _TooMany:
            self.truncated = True

    def _kind(self, index: int) -> str:
        return self.tokens[index][0] if index < len(self.tokens) else ""

    def _list(self) -> None:
        tokens = self.tokens
        while self.pos < len(tokens):
            if tokens[self.pos][0] in ",;":
                # Empty elements are obsolete syntax (RFC 5322 §4.4); a stray
                # ";" outside a group carries no address either.
                self.pos += 1
                continue
            self._element(in_group=False)

    def _address(self, in_group: bool) -> None:
        """One list element: a mailbox, a group, or a phrase without address.
        Does not consume a following "," or ";"."""
        tokens = self.tokens
        start = self.pos
        index = start
        while index < len(tokens) and tokens[index][0] not in _BOUNDARY:
            index += 1
        kind = self._kind(index)
        if kind == "<":
            # An unquoted "@" makes the display name invalid, and readers
            # differ on it: some take "user@x.example <other@y.example>" as
            # two addresses, some show only the first.  Count both; the
            # common "a@x.example <a@x.example>" still gives one domain.
            self._bare(start, index, display_name=True)
            self.pos = index
            self._angle()
        elif kind == ":":
            self._bare(start, index, display_name=True)
            self.pos = index + 1
            if in_group:
                self.errors.append("group inside a group")
            else:
                self.groups += 1
                self._group()
        else:
            self._bare(start, index)
            self.pos = index
            if kind == ">":
                self.errors.append("unexpected '>'")
                self.pos += 1

    def _group(self) -> None:
        # RFC 5322 §3.4: display-name ":" [group-list] ";".  A missing ";" at
        # the end of the field is tolerated.
        tokens = self.tokens
        while self.pos < len(tokens):
            kind = tokens[self.pos][0]
            if kind == ";":
                self.pos += 1
                return
            if kind == ",":
                self.pos += 1
                continue
            self._element(in_group=True)

    def _element(self, in_group: bool) -> None:
        before = self.pos
        self._address(in_group)
        if self.pos <= before:
            # Every branch of _address consumes a token; this guard only
            # makes a future mistake cost an error instead of a hung milter.
            self.errors.append("parser made no progress")
            self.pos = before + 1

    def _bare(self, start: int, stop: int, display_name: bool = False) -> None:
        """Addr-specs written without angle brackets in tokens[start:stop].

        Words before the local part are a phrase and ignored.  Several
        addr-specs without commas between them all count, so that a field
        such as "a@x.example b@y.example" cannot hide its second domain.
        Outside a display name, text right after a domain is an error: in
        "user@exa mple.com" the domain a reader sees is unclear.
        """
        tokens = self.tokens
        index = start
        follows_domain = False
        while index < stop:
            at = index
            while at < stop and tokens[at][0] != "@":
                at += 1
            if at == stop:
                if follows_domain and not display_name:
                    self.errors.append("unexpected text after an address")
                return  # a phrase without an address
            local = at
            if local > index and tokens[local - 1][0] in _WORDS:
                local -= 1
                while (
                    local > index
                    and tokens[local - 1][0] in _WORDS
                    and _dot_joined(tokens[local - 1], tokens[local])
                ):
                    local -= 1
            if follows_domain and local > index and not display_name:
                self.errors.append("unexpected text after an address")
            index = self._addr_spec(local, at, stop)
            follows_domain = True

    def _angle(self) -> None:
        """RFC 5322 §3.4 angle-addr at self.pos, with §4.4 obs-route."""
        tokens = self.tokens
        start = self.pos + 1
        close = start
        while close < len(tokens) and tokens[close][0] not in "<>":
            close += 1
        first = start
        if self._kind(start) == "@":
            colon = start
            while colon < close and tokens[colon][0] != ":":
                colon += 1
            if colon < close:
                # A source route: the domains before ":" are relays, not the
                # author.  Only "@", "," and domains may appear in it.
                if any(tokens[i][0] not in _ROUTE for i in range(start, colon)):
                    self.errors.append("malformed route in angle address")
                first = colon + 1
        at = first
        while at < close and tokens[at][0] != "@":
            at += 1
        if first == close:
            self._record(_Mailbox("", "", False))  # "<>"
        elif at == close:
            self._record(_Mailbox(_join(tokens, first, close), "", False))  # "<postmaster>"
        else:
            if any(tokens[i][0] not in _WORDS for i in range(first, at)) or any(
                not _dot_joined(tokens[i - 1], tokens[i]) for i in range(first + 1, at)
            ):
                self.errors.append("malformed local part in angle address")
            end = self._addr_spec(first, at, close)
            if end != close:
                self.errors.append("unexpected text in angle address")
        if self._kind(close) == ">":
            self.pos = close + 1
        elif close < len(tokens):
            self.errors.append("'<' inside an angle address")
            self.pos = close
        else:
            self.pos = close  # a missing ">" at the very end is tolerated

    def _addr_spec(self, local: int, at: int, stop: int) -> int:
        """Record the addr-spec with local part tokens[local:at], "@" at
        ``at`` and the domain after it; return the index after the domain."""
        tokens = self.tokens
        index = at + 1
        literal = False
        if index < stop and tokens[index][0] == _LITERAL_T:
            literal = True
            index += 1
        elif index < stop and tokens[index][0] == _ATOM_T:
            index += 1
            while (
                index < stop
                and tokens[index][0] == _ATOM_T
                and _dot_joined(tokens[index - 1], tokens[index])
            ):
                index += 1
        domain = _join(tokens, at + 1, index)
        self._record(_Mailbox(f"{_join(tokens, local, at)}@{domain}", domain, literal))
        return index

    def _record(self, mailbox: _Mailbox) -> None:
        if len(self.mailboxes) >= MAX_ADDRESSES:
            raise _TooMany
        self.mailboxes.append(mailbox)


def _join(tokens: list[tuple[str, str]], start: int, stop: int) -> str:
    return "".join(text for _, text in tokens[start:stop])


def _decide(parser: _Parser, blank: bool) -> AuthorResult:
    """Turn the parsed mailboxes into one of the RFC 9989 §4.2 outcomes."""
    addresses = tuple(m.address for m in parser.mailboxes)
    domains: list[str] = []
    problems: list[str] = []
    # Lists usually repeat one domain; IDNA conversion is the costly part.
    seen: dict[str, str] = {}
    for mailbox in parser.mailboxes:
        if mailbox.literal:
            problems.append(f"From address {_show(mailbox.address)} has a domain literal")
        elif not mailbox.domain:
            shown = _show(mailbox.address) if mailbox.address else "<>"
            problems.append(f"From address {shown} has no domain")
        elif mailbox.domain in seen:
            continue
        else:
            try:
                domain = normalize_domain(mailbox.domain)
            except DomainError as exc:
                cause = str(exc).partition(":")[0]
                problems.append(f"{cause}: {_show(mailbox.domain)}")
                continue
            seen[mailbox.domain] = domain
            if domain not in domains:
                domains.append(domain)

    def no_domain(reason: str) -> AuthorResult:
        return AuthorResult(AuthorStatus.NO_DOMAIN, addresses=addresses, reason=reason)

    # Several domains is the definite and security-relevant finding (RFC
    # 9989 §11.5), so it wins over any other defect of the field.
    if len(domains) > 1:
        listed = ", ".join(_show(d) for d in domains[:_MAX_LISTED])
        if len(domains) > _MAX_LISTED:
            listed += f" and {len(domains) - _MAX_LISTED} more"
        return AuthorResult(
            AuthorStatus.MULTIPLE_DOMAINS,
            addresses=addresses,
            reason=f"From field has {len(domains)} domains: {listed}",
        )
    if parser.truncated:
        return no_domain(f"From field has more than {MAX_ADDRESSES} addresses")
    if parser.errors:
        return no_domain(f"unparsable From field: {parser.errors[0]}")
    if problems:
        return no_domain(problems[0])
    if domains:
        return AuthorResult(AuthorStatus.OK, domain=domains[0], addresses=addresses)
    if parser.groups:
        return no_domain("From field is a group without addresses")
    if blank:
        return no_domain("empty From field")
    return no_domain("no address in From field")


def _show(text: str) -> str:
    """``text`` made safe for a header field or a log line: printable, short."""
    clean = "".join(c if c.isprintable() else "?" for c in text[: _MAX_SHOWN + 1])
    return clean if len(clean) <= _MAX_SHOWN else clean[: _MAX_SHOWN - 3] + "..."
