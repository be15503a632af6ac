"""The aggregate report e-mail (RFC 9990 §3; digest §6.3): filename, Subject,
Message-ID and MIME structure.  The regexes below are written from the ABNF,
not from the implementation."""

from __future__ import annotations

import datetime
import email
import email.message
import email.policy
import email.utils
import gzip
import re
from typing import Any

import pytest

from dmarcmilter.report.mail import (
    ReportMessage,
    build_report_message,
    normalize_address,
    report_filename,
    report_message_id,
    report_subject,
)

# -- the ABNF as regexes -------------------------------------------------------------

# RFC 5234 core rules.
ALPHA = "[A-Za-z]"
DIGIT = "[0-9]"
WSP = "[ \t]"
# RFC 5321 §4.1.2, used by RFC 6376 §3.5:
#   Let-dig = ALPHA / DIGIT ; Ldh-str = *( ALPHA / DIGIT / "-" ) Let-dig
#   sub-domain = Let-dig [Ldh-str] ; domain-name = sub-domain 1*("." sub-domain)
LET_DIG = "[A-Za-z0-9]"
LDH_STR = f"(?:[A-Za-z0-9-]*{LET_DIG})"
SUB_DOMAIN = f"(?:{LET_DIG}{LDH_STR}?)"
DOMAIN_NAME = rf"(?:{SUB_DOMAIN}(?:\.{SUB_DOMAIN})+)"
# RFC 5322 §3.2.3: atext, dot-atom-text.
ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
DOT_ATOM_TEXT = rf"(?:{ATEXT}+(?:\.{ATEXT}+)*)"
# RFC 5322 §3.2.2: FWS = ([*WSP CRLF] 1*WSP)
FWS = rf"(?:(?:{WSP}*\r\n)?{WSP}+)"

# Digest §6.3 filename.
UNIQUE_ID = f"(?:{ALPHA}|{DIGIT})+"
FILENAME = re.compile(
    rf"(?P<receiver>{DOMAIN_NAME})!(?P<policy>{DOMAIN_NAME})"
    rf"!(?P<begin>{DIGIT}+)!(?P<end>{DIGIT}+)"
    rf"(?:!(?P<uid>{UNIQUE_ID}))?\.(?P<ext>xml|xml\.gz)"
)
# Digest §6.3 dmarc-subject; %s keywords, so the regex stays case-sensitive.
RIDFMT = rf"(?:{DOT_ATOM_TEXT}(?:@{DOT_ATOM_TEXT})?)"
RIDTXT = rf"(?:<(?P<ridfmt_a>{RIDFMT})>|(?P<ridfmt_b>{RIDFMT}))"
SUBJECT = re.compile(
    rf"Report{FWS}+Domain:{FWS}+(?P<domain>{DOMAIN_NAME}){FWS}+"
    rf"Submitter:{FWS}+(?P<submitter>{DOMAIN_NAME}){FWS}+"
    rf"(?:Report-ID:{FWS}+(?P<ridtxt>{RIDTXT}))?"
)

# -- fixtures ------------------------------------------------------------------------

RECEIVER = "mail.receiver.example"
SUBMITTER = "mail.receiver.example"
POLICY = "example.com"
BEGIN = 1_700_006_400  # 2023-11-15T00:00:00Z
END = BEGIN + 86_399
REPORT_ID = "0f1e2d3c4b5a69788796a5b4c3d2e1f01700006400"
DATE = datetime.datetime(2023, 11, 16, 3, 4, 5, tzinfo=datetime.UTC)
ATTACHMENT = gzip.compress(b"<feedback/>" * 500, mtime=0)


def build(**overrides: Any) -> bytes:
    values: dict[str, Any] = {
        "from_address": "dmarc-reports@receiver.example",
        "to_address": "rua@example.com",
        "receiver": RECEIVER,
        "submitter": SUBMITTER,
        "org_name": "Receiver Example Org",
        "policy_domain": POLICY,
        "begin": BEGIN,
        "end": END,
        "report_id": REPORT_ID,
        "attachment": ATTACHMENT,
        "date": DATE,
    }
    values.update(overrides)
    if "filename" not in values:
        values["filename"] = report_filename(
            values["receiver"],
            values["policy_domain"],
            values["begin"],
            values["end"],
            values["report_id"],
        )
    return build_report_message(**values)


def parse(data: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def raw_header(data: bytes, name: str) -> str:
    """The field body as written, folding included (CRLFs kept)."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("ascii")
    lines = head.split("\r\n")
    for i, line in enumerate(lines):
        if line.lower().startswith(name.lower() + ":"):
            body = [line[len(name) + 1 :]]
            for more in lines[i + 1 :]:
                if more[:1] not in (" ", "\t"):
                    break
                body.append(more)
            return "\r\n".join(body)
    raise AssertionError(f"no {name} header")


def unfold(text: str) -> str:
    """RFC 5322 §2.2.3: remove every CRLF that is followed by WSP."""
    return re.sub(r"\r\n(?=[ \t])", "", text)


def leaf_parts(msg: email.message.EmailMessage) -> list[email.message.EmailMessage]:
    return [p for p in msg.walk() if not p.is_multipart()]


# -- filename ------------------------------------------------------------------------


def test_filename_matches_the_abnf() -> None:
    name = report_filename(RECEIVER, POLICY, BEGIN, END, REPORT_ID)
    assert name == f"{RECEIVER}!{POLICY}!{BEGIN}!{END}!{REPORT_ID}.xml.gz"
    match = FILENAME.fullmatch(name)
    assert match is not None
    assert match.group("uid") == REPORT_ID and match.group("ext") == "xml.gz"
    plain = report_filename(RECEIVER, POLICY, BEGIN, END, REPORT_ID, compressed=False)
    assert plain.endswith(f"!{REPORT_ID}.xml")
    assert FILENAME.fullmatch(plain) is not None


def test_filename_domains_are_lower_case_a_labels() -> None:
    name = report_filename("MX.Receiver.Example.", "Bücher.Example", 0, 86399, "AbC123")
    assert name == "mx.receiver.example!xn--bcher-kva.example!0!86399!AbC123.xml.gz"
    assert FILENAME.fullmatch(name) is not None


@pytest.mark.parametrize(
    ("receiver", "policy", "begin", "end", "unique_id"),
    [
        (RECEIVER, POLICY, BEGIN, END, "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"),  # UUID hyphens
        (RECEIVER, POLICY, BEGIN, END, ""),
        (RECEIVER, POLICY, BEGIN, END, "abc\u0661"),  # an Arabic-Indic digit is not DIGIT
        (RECEIVER, POLICY, BEGIN, END, "abc.def"),
        (RECEIVER, POLICY, BEGIN, END, "a" * 129),
        ("localhost", POLICY, BEGIN, END, "abc"),  # domain-name needs two labels
        (RECEIVER, "_dmarc.example.com", BEGIN, END, "abc"),  # no underscore in sub-domain
        (RECEIVER, "-bad.example", BEGIN, END, "abc"),
        (RECEIVER, "example..com", BEGIN, END, "abc"),
        (RECEIVER, "exa!mple.com", BEGIN, END, "abc"),
        (RECEIVER, POLICY, END, BEGIN, "abc"),  # reversed period
        (RECEIVER, POLICY, -1, END, "abc"),
    ],
)
def test_bad_filename_parts_are_refused(
    receiver: str, policy: str, begin: int, end: int, unique_id: str
) -> None:
    with pytest.raises(ValueError):
        report_filename(receiver, policy, begin, end, unique_id)


# -- Subject and Message-ID ----------------------------------------------------------


def test_subject_matches_the_abnf() -> None:
    subject = report_subject(POLICY, SUBMITTER, REPORT_ID)
    assert subject == (
        f"Report Domain: {POLICY} Submitter: {SUBMITTER} Report-ID: <{REPORT_ID}@{SUBMITTER}>"
    )
    match = SUBJECT.fullmatch(subject)
    assert match is not None
    assert match.group("domain") == POLICY and match.group("submitter") == SUBMITTER
    assert match.group("ridtxt") == report_message_id(SUBMITTER, REPORT_ID)
    # The keywords are %s: case-sensitive.
    assert SUBJECT.fullmatch(subject.replace("Domain:", "domain:")) is None


def test_subject_header_as_written_matches_folded_and_unfolded() -> None:
    data = build()
    raw = raw_header(data, "Subject")
    assert raw.startswith(" ")
    # Folded: the ABNF's FWS allows CRLF WSP between the tokens.
    assert SUBJECT.fullmatch(raw.strip(" ")) is not None
    # Unfolded: the exact subject back.
    assert unfold(raw).strip(" ") == report_subject(POLICY, SUBMITTER, REPORT_ID)


def test_long_subject_is_folded_between_tokens_only() -> None:
    submitter = "reports-" + "a" * 50 + ".mail-receiver.example"
    data = build(submitter=submitter, receiver=submitter)
    raw = raw_header(data, "Subject")
    lines = ("Subject:" + raw).split("\r\n")
    assert len(lines) >= 3
    for line in lines:
        # Over 78 only when one unbreakable token (the ridtxt) is longer.
        assert len(line) <= 78 or " " not in line.strip(" ")
        assert len(line) <= 998
    unfolded = unfold(raw).strip(" ")
    assert unfolded == report_subject(POLICY, submitter, REPORT_ID)
    match = SUBJECT.fullmatch(raw.strip(" "))
    assert match is not None and match.group("submitter") == submitter
    # The stdlib folder would have made an encoded-word of the long Report-ID.
    assert "=?" not in raw
    assert parse(data)["Subject"] == unfolded


def test_message_id_is_the_subjects_ridtxt() -> None:
    msg = parse(build())
    match = SUBJECT.fullmatch(str(msg["Subject"]))
    assert match is not None
    assert msg["Message-ID"] == match.group("ridtxt") == f"<{REPORT_ID}@{SUBMITTER}>"
    # msg-id = "<" id-left "@" id-right ">" (RFC 5322 §3.6.4), both dot-atom-text here.
    assert re.fullmatch(rf"<{DOT_ATOM_TEXT}@{DOT_ATOM_TEXT}>", msg["Message-ID"])


# -- the message ---------------------------------------------------------------------


def test_headers() -> None:
    data = build(org_name="Receiver, Inc.")
    msg = parse(data)
    assert msg["From"].addresses[0].display_name == "Receiver, Inc."
    assert msg["From"].addresses[0].addr_spec == "dmarc-reports@receiver.example"
    assert msg["To"].addresses[0].addr_spec == "rua@example.com"
    assert msg["Subject"] == report_subject(POLICY, SUBMITTER, REPORT_ID)
    assert msg["Date"].datetime == DATE
    assert raw_header(data, "Date") == " Thu, 16 Nov 2023 03:04:05 +0000"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg.get_content_type() == "multipart/mixed"
    for name in ("From", "To", "Subject", "Date", "Message-ID", "MIME-Version"):
        assert len(msg.get_all(name) or []) == 1, name
    assert not msg.defects


def test_date_is_written_in_utc() -> None:
    local = DATE.astimezone(datetime.timezone(datetime.timedelta(hours=-5)))
    data = build(date=local)
    assert raw_header(data, "Date") == " Thu, 16 Nov 2023 03:04:05 +0000"
    assert data == build()


def test_one_text_part_and_one_gzip_attachment() -> None:
    msg = parse(build())
    parts = leaf_parts(msg)
    assert [p.get_content_type() for p in parts] == ["text/plain", "application/gzip"]
    text, report = parts
    assert report.get_content_disposition() == "attachment"
    assert report.get_filename() == report_filename(RECEIVER, POLICY, BEGIN, END, REPORT_ID)
    assert report["Content-Transfer-Encoding"] == "base64"
    assert report.get_content() == ATTACHMENT
    assert not text.is_attachment()
    body = " ".join(text.get_content().split())  # the text is wrapped
    assert POLICY in body
    assert "2023-11-15T00:00:00Z" in body and "2023-11-15T23:59:59Z" in body
    assert "RFC 9990" in body and "aggregate report" in body
    assert "Receiver Example Org" in body
    assert text.get_content().endswith("\n")
    for part in parts:
        assert not part.defects


def test_uncompressed_report_is_text_xml() -> None:
    xml = b'<?xml version="1.0"?><feedback/>'
    name = report_filename(RECEIVER, POLICY, BEGIN, END, REPORT_ID, compressed=False)
    report = leaf_parts(parse(build(attachment=xml, filename=name)))[1]
    assert report.get_content_type() == "text/xml"
    assert report.get_filename() == name
    assert report.get_payload(decode=True) == xml


def test_non_ascii_org_name_and_idn_policy_domain() -> None:
    data = build(org_name="Bücherei Prüfstelle GmbH", policy_domain="BÜCHER.example")
    msg = parse(data)
    assert msg["From"].addresses[0].display_name == "Bücherei Prüfstelle GmbH"
    assert msg["Subject"] == report_subject("xn--bcher-kva.example", SUBMITTER, REPORT_ID)
    assert "Domain: xn--bcher-kva.example " in msg["Subject"]
    report = leaf_parts(msg)[1]
    assert report.get_filename() == (
        f"{RECEIVER}!xn--bcher-kva.example!{BEGIN}!{END}!{REPORT_ID}.xml.gz"
    )
    body = " ".join(leaf_parts(msg)[0].get_content().split())
    assert "xn--bcher-kva.example (bücher.example)" in body
    assert "Bücherei Prüfstelle GmbH" in body
    assert data.isascii()


def test_deterministic() -> None:
    assert build() == build()
    other = build(report_id="ffff0000")
    boundary = parse(build()).get_boundary()
    assert boundary is not None and boundary != parse(other).get_boundary()


def test_crlf_everywhere_and_no_long_lines() -> None:
    long_domain = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 octets
    for data in (build(), build(receiver=long_domain, submitter=long_domain)):
        assert data.isascii()
        assert re.search(rb"(?<!\r)\n", data) is None
        assert re.search(rb"\r(?!\n)", data) is None
        assert data.endswith(b"\r\n")
        assert max(len(line) for line in data.split(b"\r\n")) <= 998
    # Ordinary values: every header line within the recommended 78.
    head = build().split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 78


def test_a_real_consumer_reads_it() -> None:
    parsedmarc = pytest.importorskip("parsedmarc")
    xml = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n'
        b'<feedback xmlns="urn:ietf:params:xml:ns:dmarc-2.0"><version>1.0</version>'
        b"<report_metadata><org_name>Receiver Example Org</org_name>"
        b"<email>dmarc-reports@receiver.example</email>"
        b"<report_id>" + REPORT_ID.encode() + b"</report_id><date_range>"
        b"<begin>" + str(BEGIN).encode() + b"</begin><end>" + str(END).encode() + b"</end>"
        b"</date_range></report_metadata>"
        b"<policy_published><domain>example.com</domain><p>none</p></policy_published>"
        b"<record><row><source_ip>192.0.2.1</source_ip><count>3</count><policy_evaluated>"
        b"<disposition>none</disposition><dkim>pass</dkim><spf>fail</spf></policy_evaluated>"
        b"</row><identifiers><header_from>example.com</header_from></identifiers>"
        b"<auth_results><dkim><domain>example.com</domain><selector>s1</selector>"
        b"<result>pass</result></dkim></auth_results></record></feedback>"
    )
    parsed = parsedmarc.parse_report_email(
        build(attachment=gzip.compress(xml, mtime=0)), offline=True
    )
    assert parsed["report_type"] == "aggregate"
    assert parsed["report"]["report_metadata"]["report_id"] == REPORT_ID
    assert parsed["report"]["records"][0]["count"] == 3


# -- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"from_address": "not an address"},
        {"from_address": "Receiver <dmarc@receiver.example>"},
        {"from_address": "dmarc@"},
        {"from_address": "@receiver.example"},
        {"from_address": "dmarc@receiver.example\r\nBcc: victim@example.net"},
        {"to_address": "rua@example.com\nBcc: victim@example.net"},
        {"to_address": "rua example.com"},
        {"org_name": "Org\r\nBcc: victim@example.net"},
        {"org_name": "Org\x00"},
        {"org_name": "x" * 300},
        {"policy_domain": "example.com\r\n"},
        {"submitter": "mail.receiver.example\nX: y"},
        {"receiver": "receiver_example"},
        {"report_id": "abc-123"},
        {"report_id": "abc\r\n"},
        {"date": datetime.datetime(2023, 11, 16, 3, 4, 5)},  # naive: which zone?
        {"filename": "report.xml.gz"},
        {"filename": f"{RECEIVER}!{POLICY}!{BEGIN}!{END}!otherid.xml.gz"},
        {"filename": f"{RECEIVER}!{POLICY}!{BEGIN}!{END}!{REPORT_ID}.xml.gz\r\nX: y"},
        {"filename": f"{RECEIVER}!{POLICY}!{BEGIN}!{END}!{REPORT_ID}.zip"},
    ],
)
def test_bad_input_is_a_value_error(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        build(**overrides)


def test_addresses_are_normalised() -> None:
    assert normalize_address("RUA@Bücher.Example") == "RUA@xn--bcher-kva.example"
    with pytest.raises(ValueError, match="recipient"):
        normalize_address("nobody", "recipient")


def test_report_message_holds_a_built_message() -> None:
    data = build()
    report = ReportMessage(
        sender="dmarc-reports@receiver.example", recipient="rua@example.com", message=data
    )
    assert parse(report.message)["To"] == report.recipient
