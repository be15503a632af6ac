"""Test signing kit: fixed keys, DKIM signatures, ARC sets and plain messages.

Everything is deterministic: the keys are committed under ``tests/data/keys``
(test-only, never used anywhere else), timestamps default to
:data:`FIXED_TIMESTAMP`, and RSA PKCS#1 v1.5 and ed25519 signatures depend only
on key and data.  So a signed message is byte-identical on every run and golden
outputs built from it stay stable.

Signatures are produced by dkimpy's header signer (``gen_header``), with the
tag list built here so tests can set t=, x=, l=, i= and any odd tag that
dkimpy's own ``sign()`` does not offer.

Keys, by name: ``rsa`` (= ``rsa2048``), ``rsa1024``, ``rsa512`` (too small,
RFC 8301 §3.2) and ``ed25519`` (RFC 8463).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path

import dkim
import dkim.crypto
import nacl.encoding
import nacl.signing
from dkim.canonicalization import CanonicalizationPolicy

from dmarcmilter.dkim import ENGINE_LOGGER

KEY_DIR = Path(__file__).resolve().parent / "data" / "keys"

# 2023-11-14 22:13:20 UTC: in the past, so no verifier sees t= in the future.
FIXED_TIMESTAMP = 1_700_000_000
FIXED_DATE = "Tue, 14 Nov 2023 22:13:20 +0000"
FIXED_MESSAGE_ID = "<20231114221320.0001@example.com>"

_KEY_FILES = {
    "rsa": "rsa2048",
    "rsa2048": "rsa2048",
    "rsa1024": "rsa1024",
    "rsa512": "rsa512",
    "ed25519": "ed25519",
}

# Header fields signed by default, in this order, those present only.
DEFAULT_SIGNED = (
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
)


def key_type(key: str) -> str:
    """``"rsa"`` or ``"ed25519"``."""
    _check_key(key)
    return "ed25519" if key == "ed25519" else "rsa"


def algorithm(key: str) -> bytes:
    return b"ed25519-sha256" if key_type(key) == "ed25519" else b"rsa-sha256"


@cache
def private_key(key: str = "rsa") -> bytes:
    """The private key as dkimpy's signer takes it: PEM for RSA, the base64
    seed for ed25519."""
    _check_key(key)
    data = (KEY_DIR / f"{_KEY_FILES[key]}.key").read_bytes()
    return data.strip() if key == "ed25519" else data


@cache
def public_key_b64(key: str = "rsa") -> str:
    """The p= value: base64 SubjectPublicKeyInfo (RSA) or raw key (ed25519)."""
    _check_key(key)
    text = (KEY_DIR / f"{_KEY_FILES[key]}.pub").read_text()
    return "".join(line.strip() for line in text.splitlines() if not line.startswith("-----"))


def dkim_key_record(key: str = "rsa", *, extra: str = "", p: str | None = None) -> str:
    """The key record text, e.g. ``v=DKIM1; k=rsa; p=...``.  ``p`` overrides
    the public key (``""`` for a revoked key); ``extra`` is added before p=."""
    value = public_key_b64(key) if p is None else p
    parts = ["v=DKIM1", f"k={key_type(key)}"]
    if extra:
        parts.append(extra.strip().strip(";"))
    parts.append(f"p={value}")
    return "; ".join(parts)


def dkim_zone(
    domain: str, selector: str, key: str = "rsa", *, record: str | None = None
) -> dict[str, list[tuple[str, list[str]]]]:
    """Zone data publishing the key, for ``dns_server.add_zone``.  The record
    is split into character-strings of at most 250 octets, as zone files do
    for 2048-bit keys."""
    text = dkim_key_record(key) if record is None else record
    chunks = [text[i : i + 250] for i in range(0, len(text), 250)] or [""]
    return {f"{selector}._domainkey.{domain}": [("TXT", chunks)]}


def dkim_sign(
    message: bytes,
    domain: str,
    selector: str,
    key: str = "rsa",
    headers: Sequence[str] | None = None,
    timestamp: int | None = FIXED_TIMESTAMP,
    *,
    canonicalize: tuple[str, str] = ("relaxed", "simple"),
    identity: str | None = None,
    length: bool | int = False,
    expire: int | None = None,
    extra_tags: Iterable[tuple[str, str]] = (),
) -> bytes:
    """Return ``message`` with a DKIM-Signature field prepended.

    ``headers``: the h= list (default: those of :data:`DEFAULT_SIGNED`
    present).  ``timestamp``: t=, or None for no t= tag.  ``length``: True for
    l= covering the whole body, an int for l= of that many octets (the body
    hash then covers at most that many).
    ``expire``: x=.  ``extra_tags`` are added before h=.
    """
    signer = dkim.DKIM(message, logger=ENGINE_LOGGER, signature_algorithm=algorithm(key))
    signer.hasher = dkim.crypto.HASH_ALGORITHMS[algorithm(key)]
    policy = CanonicalizationPolicy.from_c_value("/".join(canonicalize).encode())
    include = _include_headers(signer, headers)
    body = policy.canonicalize_body(signer.body)
    if length is not True and length is not False:
        body = body[:length]
    fields: list[tuple[bytes, bytes]] = [
        (b"v", b"1"),
        (b"a", algorithm(key)),
        (b"c", policy.to_c_value()),
        (b"d", domain.encode()),
    ]
    if identity is not None:
        fields.append((b"i", identity.encode()))
    if length is not False:
        # l= as given, even past the body's end (a test of RFC 6376 §3.5).
        fields.append((b"l", str(len(body) if length is True else length).encode()))
    fields.append((b"s", selector.encode()))
    if timestamp is not None:
        fields.append((b"t", str(timestamp).encode()))
    if expire is not None:
        fields.append((b"x", str(expire).encode()))
    fields.extend((k.encode(), v.encode()) for k, v in extra_tags)
    fields += [
        (b"h", b":".join(include)),
        (b"bh", base64.b64encode(hashlib.sha256(body).digest())),
        # A placeholder of this length makes dkimpy fold b= onto a line of its
        # own, so inserting the real value does not refold the other tags.
        (b"b", b"0" * 60),
    ]
    value: bytes = signer.gen_header(fields, include, policy, b"DKIM-Signature", _signing_key(key))
    return b"DKIM-Signature: " + value + message


def arc_seal(
    message: bytes,
    domain: str,
    selector: str,
    key: str = "rsa",
    authserv_id: str = "mx.forwarder.example",
    results: str = "spf=pass smtp.mailfrom=example.com; dkim=pass header.d=example.com; "
    "dmarc=pass header.from=example.com",
    *,
    cv: str | None = None,
    timestamp: int = FIXED_TIMESTAMP,
    headers: Sequence[str] | None = None,
) -> bytes:
    """Return ``message`` with the next ARC set (RFC 8617 §4.1) prepended:
    ARC-Seal, ARC-Message-Signature and ARC-Authentication-Results, instance
    one above the highest present.  ``results`` is the AAR payload after the
    authserv-id; ``cv`` defaults to ``none`` for instance 1, else ``pass``.
    Only RSA keys: ARC uses rsa-sha256 (RFC 8617 §4.1.2)."""
    if key_type(key) != "rsa":
        raise ValueError("ARC sets are signed with rsa-sha256")
    sealer = dkim.ARC(message, logger=ENGINE_LOGGER, signature_algorithm=b"rsa-sha256")
    sealer.hasher = dkim.crypto.HASH_ALGORITHMS[b"rsa-sha256"]
    policy = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    include = _include_headers(sealer, headers)
    pk = _signing_key(key)
    instance = _highest_instance(sealer.headers) + 1
    status = (cv or ("none" if instance == 1 else "pass")).encode()
    n = str(instance).encode()
    stamp = str(timestamp).encode()

    aar = b"i=" + n + b"; " + authserv_id.encode() + b"; " + results.encode() + b"\r\n"
    sealer.headers.insert(0, [b"ARC-Authentication-Results", b" " + aar])

    bodyhash = hashlib.sha256(policy.canonicalize_body(sealer.body)).digest()
    ams_fields = [
        (b"i", n),
        (b"a", b"rsa-sha256"),
        (b"c", b"relaxed/relaxed"),
        (b"d", domain.encode()),
        (b"s", selector.encode()),
        (b"t", stamp),
        (b"h", b":".join(include)),
        (b"bh", base64.b64encode(bodyhash)),
        (b"b", b"0" * 60),
    ]
    ams: bytes = sealer.gen_header(ams_fields, include, policy, b"ARC-Message-Signature", pk)
    sealer.headers.insert(0, [b"ARC-Message-Signature", b" " + ams])

    # RFC 8617 §5.1.1: the seal covers every ARC set, oldest first, each as
    # AAR, AMS, AS; its own AS last (added by the signer, b= empty).  dkimpy
    # picks repeated fields from the bottom up, so the older sets, lower in
    # the header, come first.
    seal_include = [b"arc-authentication-results", b"arc-message-signature", b"arc-seal"]
    seal_include = seal_include * (instance - 1) + seal_include[:2]
    as_fields = [
        (b"i", n),
        (b"cv", status),
        (b"a", b"rsa-sha256"),
        (b"d", domain.encode()),
        (b"s", selector.encode()),
        (b"t", stamp),
        (b"b", b"0" * 60),
    ]
    seal: bytes = sealer.gen_header(as_fields, seal_include, policy, b"ARC-Seal", pk)
    return (
        b"ARC-Seal: "
        + seal
        + b"ARC-Message-Signature: "
        + ams
        + b"ARC-Authentication-Results: "
        + aar
        + message
    )


def make_message(
    from_: str = "Alice Example <alice@example.com>",
    to: str = "Bob Example <bob@example.net>",
    subject: str = "Quarterly report",
    body: str | bytes = "Hello Bob,\n\nthe report is attached in spirit.\n\nAlice\n",
    extra_headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    *,
    date: str = FIXED_DATE,
    message_id: str = FIXED_MESSAGE_ID,
) -> bytes:
    """A plain RFC 5322 message with CRLF line endings and a fixed Date and
    Message-ID.  ``extra_headers`` come after the standard fields."""
    fields = [
        ("From", from_),
        ("To", to),
        ("Subject", subject),
        ("Date", date),
        ("Message-ID", message_id),
        ("MIME-Version", "1.0"),
        ("Content-Type", "text/plain; charset=utf-8"),
    ]
    extra = extra_headers.items() if isinstance(extra_headers, Mapping) else extra_headers
    fields.extend(extra)
    head = b"".join(f"{name}: {value}\r\n".encode() for name, value in fields)
    raw = body.encode() if isinstance(body, str) else body
    raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return head + b"\r\n" + raw


def _check_key(key: str) -> None:
    if key not in _KEY_FILES:
        raise ValueError(f"unknown test key {key!r}; one of {sorted(_KEY_FILES)}")


def _signing_key(key: str) -> object:
    if key_type(key) == "ed25519":
        return nacl.signing.SigningKey(private_key(key), encoder=nacl.encoding.Base64Encoder)
    return dkim.crypto.parse_pem_private_key(private_key(key))


def _include_headers(signer: object, headers: Sequence[str] | None) -> list[bytes]:
    if headers is not None:
        return [h.lower().encode() for h in headers]
    present = {name.lower() for name, _ in signer.headers}  # type: ignore[attr-defined]
    return [h.encode() for h in DEFAULT_SIGNED if h.encode() in present]


def _highest_instance(headers: Iterable[Sequence[bytes]]) -> int:
    highest = 0
    for name, value in headers:
        if name.lower() != b"arc-seal":
            continue
        for spec in value.split(b";"):
            tag, _, val = spec.partition(b"=")
            if tag.strip() == b"i" and val.strip().isdigit():
                highest = max(highest, int(val.strip()))
    return highest
