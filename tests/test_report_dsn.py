"""Delivery status notifications (RFC 3464): what the parser reads from the
bounces real MTAs send, and what it refuses.

The samples follow what Postfix, Sendmail, Exim, Gmail and Microsoft
servers send, with their differences: field order and case, folding,
blank lines, quoted boundaries, the returned original as message/rfc822 or
text/rfc822-headers, a base64 delivery-status part.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmarcmilter.message import Message
from dmarcmilter.report.dsn import (
    MAX_DSN_BYTES,
    MAX_PARTS,
    MAX_RECIPIENTS,
    MAX_VALUE_CHARS,
    Action,
    DeliveryReport,
    parse_dsn,
)

REPORT_ID = "<8f3a1c2e9b7d4e0fa1b2c3d4e5f60718@mx.example.org>"

REPORT_HEADERS = f"""\
Return-Path: <dmarc-reports@example.org>
Received: from mx.example.org (mx.example.org [192.0.2.25])
\tby mx.receiver.example (Postfix) with ESMTPS id 4XyZ1
\tfor <dmarc@receiver.example>; Sat,  5 Dec 2026 01:00:03 +0000 (UTC)
DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=s1; h=from:to:subject;
\tbh=abc; b=def
From: dmarc-reports@example.org
To: dmarc@receiver.example
Subject: Report Domain: receiver.example Submitter: mx.example.org
 Report-ID: <8f3a1c2e9b7d4e0fa1b2c3d4e5f60718>
Date: Sat, 05 Dec 2026 01:00:00 +0000
Message-ID: {REPORT_ID}
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="r1"
"""

POSTFIX = f"""\
Return-Path: <>
Received: by mx.example.org (Postfix)
\tid 7A1B2C3D4E; Sat,  5 Dec 2026 01:00:05 +0000 (UTC)
Date: Sat,  5 Dec 2026 01:00:05 +0000 (UTC)
From: MAILER-DAEMON@mx.example.org (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: dmarc-reports@example.org
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="7A1B2C3D4E.1764896405/mx.example.org"
Content-Transfer-Encoding: 8bit
Message-Id: <20261205010005.7A1B2C3D4E@mx.example.org>

This is a MIME-encapsulated message.

--7A1B2C3D4E.1764896405/mx.example.org
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx.example.org.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

<dmarc@receiver.example>: host mx.receiver.example[198.51.100.7] said: 550
    5.1.1 <dmarc@receiver.example>: Recipient address rejected: User unknown
    in virtual mailbox table (in reply to RCPT TO command)

--7A1B2C3D4E.1764896405/mx.example.org
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org
X-Postfix-Queue-ID: 7A1B2C3D4E
X-Postfix-Sender: rfc822; dmarc-reports@example.org
Arrival-Date: Sat,  5 Dec 2026 01:00:03 +0000 (UTC)

Final-Recipient: rfc822; dmarc@receiver.example
Original-Recipient: rfc822;DMARC@Receiver.example
Action: failed
Status: 5.1.1
Remote-MTA: dns; mx.receiver.example
Diagnostic-Code: smtp; 550 5.1.1 <dmarc@receiver.example>: Recipient address
    rejected: User unknown in virtual mailbox table

--7A1B2C3D4E.1764896405/mx.example.org
Content-Description: Undelivered Message
Content-Type: message/rfc822

{REPORT_HEADERS}
--r1
Content-Type: text/plain

A DMARC aggregate report.
--r1--

--7A1B2C3D4E.1764896405/mx.example.org--
"""

SENDMAIL = f"""\
From: Mail Delivery Subsystem <MAILER-DAEMON@relay.example.org>
Message-Id: <202612050100.4B510A0x012345@relay.example.org>
To: <dmarc-reports@example.org>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="4B510A0x012345.1764896405/relay.example.org"
Subject: Returned mail: see transcript for details
Auto-Submitted: auto-generated (failure)

This is a MIME-encapsulated message

--4B510A0x012345.1764896405/relay.example.org

The original message was received at Sat, 5 Dec 2026 01:00:03 GMT
from mx.example.org [192.0.2.25]

   ----- The following addresses had permanent fatal errors -----
<reports@dead.example>
    (reason: 550 5.2.1 Mailbox disabled)
<postmaster@slow.example>

--4B510A0x012345.1764896405/relay.example.org
Content-Type: message/delivery-status

Reporting-MTA: DNS; relay.example.org
Received-From-MTA: DNS; mx.example.org
Arrival-Date: Sat, 5 Dec 2026 01:00:03 GMT

Final-Recipient: RFC822; <reports@dead.example>
Action: failed
Status: 5.2.1
Remote-MTA: DNS; mx.dead.example
Diagnostic-Code: SMTP; 550 5.2.1 Mailbox disabled for this
\trecipient
Last-Attempt-Date: Sat, 5 Dec 2026 01:00:05 GMT

Final-Recipient: RFC822; postmaster@slow.example
Action: failed
Status: 4.4.7
Last-Attempt-Date: Sat, 5 Dec 2026 01:00:05 GMT

--4B510A0x012345.1764896405/relay.example.org
Content-Type: text/rfc822-headers

{REPORT_HEADERS}
--4B510A0x012345.1764896405/relay.example.org--
"""

EXIM = f"""\
X-Failed-Recipients: rua@exim.example
Auto-Submitted: auto-replied
From: Mail Delivery System <Mailer-Daemon@exim.example>
To: dmarc-reports@example.org
Content-Type: multipart/report; report-type=delivery-status; boundary=1764896405-eximdsn-123
MIME-Version: 1.0
Subject: Mail delivery failed: returning message to sender
Message-Id: <E1t0001-000001-AB@exim.example>

--1764896405-eximdsn-123
Content-type: text/plain; charset=us-ascii

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  rua@exim.example
    mailbox is full: retry timeout exceeded

--1764896405-eximdsn-123
Content-type: message/delivery-status

Reporting-MTA: dns; exim.example

Action: failed
Final-Recipient: rfc822;rua@exim.example
Status: 5.0.0

--1764896405-eximdsn-123
Content-type: message/rfc822

{REPORT_HEADERS}
--1764896405-eximdsn-123--
"""

GMAIL = f"""\
Return-Path: <>
From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>
To: dmarc-reports@example.org
Auto-Submitted: auto-replied
Subject: Delivery Status Notification (Failure)
Message-ID: <6751a2b3.abc.1234@mx.google.com>
Date: Fri, 05 Dec 2026 01:00:06 -0800 (PST)
Content-Type: multipart/report; boundary="000000000000aaaa"; report-type=delivery-status

--000000000000aaaa
Content-Type: multipart/related; boundary="000000000000bbbb"

--000000000000bbbb
Content-Type: multipart/alternative; boundary="000000000000cccc"

--000000000000cccc
Content-Type: text/plain; charset="UTF-8"

Address not found
Your message wasn't delivered to gone@gmail.example because the address
couldn't be found, or is unable to receive mail.

--000000000000cccc
Content-Type: message/delivery-status

Final-Recipient: rfc822; decoy@nested.example
Action: failed
Status: 5.1.1

--000000000000cccc--
--000000000000bbbb--

--000000000000aaaa
Content-Type: message/delivery-status

Reporting-MTA: dns; googlemail.com
Received-From-MTA: dns; mx.example.org
Arrival-Date: Fri, 05 Dec 2026 01:00:05 -0800 (PST)
X-Original-Message-ID: {REPORT_ID}

Final-Recipient: rfc822; gone@gmail.example
Action: failed
Status: 5.1.1
Remote-MTA: dns; gmail-smtp-in.l.google.com. (2607:f8b0::1b, the server for
 the domain gmail.example.)
Diagnostic-Code: smtp; 550-5.1.1 The email account that you tried to reach
 does not exist. Please try double-checking the recipient's email
 address for typos or unnecessary spaces.
Last-Attempt-Date: Fri, 05 Dec 2026 01:00:06 -0800 (PST)

--000000000000aaaa
Content-Type: text/rfc822-headers

{REPORT_HEADERS}
--000000000000aaaa--
"""

DELAYED = """\
From: MAILER-DAEMON@mx.example.org (Mail Delivery System)
Subject: Delayed Mail (still being retried)
To: dmarc-reports@example.org
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="D1.1764896405/mx.example.org"

--D1.1764896405/mx.example.org
Content-Type: text/plain

This is the mail system at host mx.example.org.
####################################################################
# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #
####################################################################

--D1.1764896405/mx.example.org
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org
Arrival-Date: Sat,  5 Dec 2026 01:00:03 +0000 (UTC)

Final-Recipient: rfc822; dmarc@greylist.example
Original-Recipient: rfc822;dmarc@greylist.example
Action: delayed
Status: 4.4.1
Diagnostic-Code: X-Postfix; connect to mx.greylist.example[198.51.100.9]:25:
    Connection timed out
Will-Retry-Until: Sat, 10 Dec 2026 01:00:03 +0000 (UTC)

--D1.1764896405/mx.example.org
Content-Type: text/rfc822-headers

Message-ID: <delayed-report@mx.example.org>
From: dmarc-reports@example.org

--D1.1764896405/mx.example.org--
"""


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


def test_postfix_bounce() -> None:
    report = parse_dsn(crlf(POSTFIX))
    assert report.is_dsn, report.not_dsn
    assert report.reporting_mta == "mx.example.org"
    assert report.original_message_id == REPORT_ID
    (r,) = report.recipients
    assert (r.final_recipient, r.original_recipient) == (
        "dmarc@receiver.example",
        "DMARC@Receiver.example",
    )
    # The address our mail went to is the original recipient.
    assert r.address == "DMARC@Receiver.example"
    assert (r.action, r.status, r.hard_bounce) == (Action.FAILED, "5.1.1", True)
    assert r.remote_mta == "mx.receiver.example"
    assert r.diagnostic == (
        "smtp; 550 5.1.1 <dmarc@receiver.example>: Recipient address rejected: "
        "User unknown in virtual mailbox table"
    )
    assert report.hard_bounces == (r,)
    assert not report.truncated


def test_message_and_bytes_give_the_same_result() -> None:
    assert parse_dsn(Message.from_bytes(POSTFIX.encode())) == parse_dsn(crlf(POSTFIX))
    # Bare LF line ends, as a stored file may have them.
    assert parse_dsn(POSTFIX.encode()) == parse_dsn(crlf(POSTFIX))


def test_sendmail_bounce_with_a_timed_out_recipient() -> None:
    report = parse_dsn(crlf(SENDMAIL))
    assert report.is_dsn, report.not_dsn
    assert report.reporting_mta == "relay.example.org"
    assert report.original_message_id == REPORT_ID
    dead, slow = report.recipients
    assert (dead.final_recipient, dead.original_recipient) == ("reports@dead.example", None)
    assert dead.address == "reports@dead.example"
    assert (dead.status, dead.hard_bounce) == ("5.2.1", True)
    assert dead.diagnostic == "SMTP; 550 5.2.1 Mailbox disabled for this recipient"
    # Failed after queueing too long: the destination may work tomorrow.
    assert (slow.action, slow.status, slow.hard_bounce) == (Action.FAILED, "4.4.7", False)
    assert report.hard_bounces == (dead,)


def test_exim_bounce_with_action_first() -> None:
    report = parse_dsn(crlf(EXIM))
    assert report.is_dsn, report.not_dsn
    (r,) = report.recipients
    assert (r.final_recipient, r.action, r.status, r.hard_bounce) == (
        "rua@exim.example",
        Action.FAILED,
        "5.0.0",
        True,
    )
    assert report.original_message_id == REPORT_ID


def test_gmail_bounce_ignores_nested_parts() -> None:
    report = parse_dsn(crlf(GMAIL))
    assert report.is_dsn, report.not_dsn
    assert report.reporting_mta == "googlemail.com"
    # Only the top-level delivery-status part counts, not one inside the
    # human-readable part.
    (r,) = report.recipients
    assert (r.final_recipient, r.status, r.hard_bounce) == ("gone@gmail.example", "5.1.1", True)
    assert r.diagnostic.startswith("smtp; 550-5.1.1 The email account that you tried to reach")
    assert report.original_message_id == REPORT_ID


def test_delayed_dsn_is_not_a_hard_bounce() -> None:
    report = parse_dsn(crlf(DELAYED))
    assert report.is_dsn, report.not_dsn
    (r,) = report.recipients
    assert (r.action, r.status, r.permanent, r.hard_bounce) == (
        Action.DELAYED,
        "4.4.1",
        False,
        False,
    )
    assert report.hard_bounces == ()
    assert report.original_message_id == "<delayed-report@mx.example.org>"


def test_base64_delivery_status_and_odd_spelling() -> None:
    status = (
        b"Reporting-MTA: dns;EX01.corp.example\r\n\r\n"
        b"Final-recipient: RFC822;Someone@Corp.Example\r\n"
        b"ACTION: Failed (permanent)\r\n"
        b"status: 5.4.1 (relay access denied)\r\n"
    )
    encoded = __import__("base64").encodebytes(status).decode()
    message = (
        "From: postmaster@corp.example\n"
        'Content-Type: Multipart/Report; Report-Type="delivery-status";\n'
        '  boundary="_b_"\n\n'
        "--_b_\nContent-Type: text/plain\n\nDelivery has failed.\n"
        "--_b_\nContent-Type: message/delivery-status\n"
        "Content-Transfer-Encoding: base64\n\n"
        f"{encoded}"
        "--_b_\nContent-Type: message/rfc822\n\n"
        "Message-ID:\n <folded@example.org>\nSubject: x\n\nbody\n"
        "--_b_--\n"
    )
    report = parse_dsn(message.encode())
    assert report.is_dsn, report.not_dsn
    (r,) = report.recipients
    assert (r.final_recipient, r.action, r.status, r.hard_bounce) == (
        "Someone@Corp.Example",
        Action.FAILED,
        "5.4.1",
        True,
    )
    assert report.reporting_mta == "EX01.corp.example"
    assert report.original_message_id == "<folded@example.org>"


def dsn(groups: str, *, top: str = "", original: str = "") -> bytes:
    """A minimal DSN around the given delivery-status body."""
    parts = "--b\nContent-Type: message/delivery-status\n\n" + groups + "\n"
    if original:
        parts += "--b\nContent-Type: text/rfc822-headers\n\n" + original + "\n"
    content_type = top or "multipart/report; report-type=delivery-status; boundary=b"
    return f"From: x@y.example\nContent-Type: {content_type}\n\n{parts}--b--\n".encode()


ONE = "Reporting-MTA: dns; a.example\n\nFinal-Recipient: rfc822; u@d.example\nAction: failed\n"


def test_a_minimal_dsn() -> None:
    report = parse_dsn(dsn(ONE + "Status: 5.1.1"))
    assert report.is_dsn
    assert [r.status for r in report.hard_bounces] == ["5.1.1"]
    assert report.original_message_id is None


def test_not_a_dsn() -> None:
    cases = {
        b"": "no header section",
        b"\x00\xff\xfe garbage": "no header section",
        b"Subject: hi\n\nhello\n": "not multipart/report",
        b"Content-Type: multipart/mixed; boundary=b\n\n--b\n\nx\n--b--\n": "multipart/report",
        dsn(
            ONE + "Status: 5.1.1", top="multipart/report; report-type=feedback-report; boundary=b"
        ): ("report-type is feedback-report"),
        dsn(ONE + "Status: 5.1.1", top="multipart/report; boundary=b"): "report-type is missing",
        dsn(ONE + "Status: 5.1.1", top="multipart/report; report-type=delivery-status"): (
            "no usable multipart boundary"
        ),
        dsn(
            ONE + "Status: 5.1.1",
            top=f"multipart/report; report-type=delivery-status; boundary={'b' * 201}",
        ): "no usable multipart boundary",
        dsn(
            ONE + "Status: 5.1.1", top="multipart/report; report-type=delivery-status; boundary=c"
        ): ("no message/delivery-status part"),
        dsn("Reporting-MTA: dns; a.example"): "no usable per-recipient fields",
    }
    for data, why in cases.items():
        report = parse_dsn(data)
        assert not report.is_dsn, data
        assert why in report.not_dsn, (data, report.not_dsn)
        assert report.recipients == ()


def test_unusable_recipient_groups_are_skipped_not_guessed() -> None:
    bad_groups = [
        "Final-Recipient: rfc822; a@d.example\nAction: failed",  # no Status
        "Final-Recipient: rfc822; a@d.example\nStatus: 5.1.1",  # no Action
        "Final-Recipient: rfc822; a@d.example\nAction: bounced\nStatus: 5.1.1",
        "Final-Recipient: rfc822; a@d.example\nAction: failed\nStatus: 5.1",
        "Final-Recipient: rfc822; a@d.example\nAction: failed\nStatus: 550 5.1.1",
        "Final-Recipient: rfc822; a@d.example\nAction: failed\nStatus: 5.1.1.1",
        "Final-Recipient: rfc822; a@d.example\nAction: failed\nStatus: 6.1.1",
        # Which address, which status?
        "Final-Recipient: rfc822; a@d.example\nFinal-Recipient: rfc822; b@d.example\n"
        "Action: failed\nStatus: 5.1.1",
        "Final-Recipient: rfc822; a@d.example\nAction: failed\nStatus: 5.1.1\nStatus: 2.0.0",
        "Final-Recipient: rfc822; a@d.example\nOriginal-Recipient: rfc822; junk\n"
        "Action: failed\nStatus: 5.1.1",
        "Final-Recipient: rfc822; no-domain\nAction: failed\nStatus: 5.1.1",
        "Final-Recipient: rfc822; a b@d.example\nAction: failed\nStatus: 5.1.1",
        "Final-Recipient: rfc822; a@d.example\x00\nAction: failed\nStatus: 5.1.1",
        f"Final-Recipient: rfc822; {'a' * 320}@d.example\nAction: failed\nStatus: 5.1.1",
    ]
    good = "Final-Recipient: rfc822; ok@d.example\nAction: failed\nStatus: 5.7.1"
    report = parse_dsn(dsn("Reporting-MTA: dns; a.example\n\n" + "\n\n".join([*bad_groups, good])))
    assert report.is_dsn
    assert [r.final_recipient for r in report.recipients] == ["ok@d.example"]
    assert (report.skipped, report.truncated) == (len(bad_groups), True)


def test_returned_message_id_must_be_unambiguous() -> None:
    groups = ONE + "Status: 5.1.1"
    for original, expected in [
        ("Message-ID: <one@example.org>", "<one@example.org>"),
        ("message-id:<one@example.org> (comment)", "<one@example.org>"),
        ("Message-ID: <one@example.org>\nMessage-ID: <two@example.org>", None),
        ("Message-ID: no brackets", None),
        ("Subject: none", None),
        (f"Message-ID: <{'x' * 1000}@example.org>", None),
    ]:
        assert parse_dsn(dsn(groups, original=original)).original_message_id == expected, original


def test_many_recipients_are_capped() -> None:
    groups = "\n\n".join(
        f"Final-Recipient: rfc822; u{i}@d.example\nAction: failed\nStatus: 5.1.1"
        for i in range(MAX_RECIPIENTS + 50)
    )
    report = parse_dsn(dsn("Reporting-MTA: dns; a.example\n\n" + groups))
    assert report.is_dsn
    assert len(report.recipients) == MAX_RECIPIENTS
    assert report.recipients[-1].final_recipient == f"u{MAX_RECIPIENTS - 1}@d.example"
    assert report.truncated


def test_long_values_are_cut() -> None:
    report = parse_dsn(dsn(ONE + "Status: 5.1.1\nDiagnostic-Code: smtp; 550 " + "x" * 5000))
    (r,) = report.recipients
    assert len(r.diagnostic) == MAX_VALUE_CHARS
    assert r.diagnostic.endswith("...")


def test_oversized_bounce_is_read_up_to_the_limit() -> None:
    # A bounce returning a large report in full: the delivery-status part
    # and the returned headers come first and are read.
    big = crlf(POSTFIX).replace(
        b"A DMARC aggregate report.", b"A" * 76 + (b"\r\n" + b"A" * 76) * 45_000
    )
    assert len(big) > 3 * MAX_DSN_BYTES
    report = parse_dsn(big)
    assert report.is_dsn, report.not_dsn
    assert report.original_message_id == REPORT_ID
    assert [r.final_recipient for r in report.hard_bounces] == ["dmarc@receiver.example"]


def test_oversized_before_the_status_part_is_not_a_dsn() -> None:
    padding = "x" * 76 + "\n"
    filler = "--b\nContent-Type: text/plain\n\n" + padding * (MAX_DSN_BYTES // len(padding)) + "\n"
    data = dsn(ONE + "Status: 5.1.1").replace(b"\n\n--b\n", b"\n\n" + filler.encode() + b"--b\n", 1)
    assert len(data) > MAX_DSN_BYTES
    assert parse_dsn(data).not_dsn == "no message/delivery-status part"


def test_status_part_cut_by_the_limit_is_not_a_dsn() -> None:
    # A status part that does not end within the limit: its last group
    # could be cut anywhere, a Status included.
    groups = "\n\n".join(
        f"Final-Recipient: rfc822; u{i}@d.example\nAction: failed\nStatus: 5.1.1"
        for i in range(MAX_DSN_BYTES // 50)
    )
    report = parse_dsn(dsn("Reporting-MTA: dns; a.example\n\n" + groups))
    assert not report.is_dsn
    assert "does not end within" in report.not_dsn


def test_parts_beyond_the_limit_are_not_read() -> None:
    filler = "--b\nContent-Type: text/plain\n\nx\n" * MAX_PARTS
    data = dsn(ONE + "Status: 5.1.1").replace(b"\n\n--b\n", b"\n\n" + filler.encode() + b"--b\n", 1)
    assert parse_dsn(data).not_dsn == "no message/delivery-status part"
    fewer = "--b\nContent-Type: text/plain\n\nx\n" * (MAX_PARTS - 1)
    data = dsn(ONE + "Status: 5.1.1").replace(b"\n\n--b\n", b"\n\n" + fewer.encode() + b"--b\n", 1)
    assert parse_dsn(data).is_dsn


SAMPLES = [crlf(s) for s in (POSTFIX, SENDMAIL, EXIM, GMAIL, DELAYED)]


@settings(max_examples=300, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    sample=st.sampled_from(SAMPLES),
    cuts=st.lists(st.tuples(st.integers(0, 20_000), st.integers(0, 200)), max_size=4),
    junk=st.binary(max_size=64),
)
def test_mangled_samples_never_raise(
    sample: bytes, cuts: list[tuple[int, int]], junk: bytes
) -> None:
    data = sample
    for at, length in cuts:
        at %= len(data) + 1
        data = data[:at] + junk + data[at + length :]
    report = parse_dsn(data)
    assert isinstance(report, DeliveryReport)
    assert report.is_dsn == bool(report.recipients)
    assert len(report.recipients) <= MAX_RECIPIENTS
    for r in report.recipients:
        assert r.hard_bounce == (r.action is Action.FAILED and r.status.startswith("5."))


@settings(max_examples=200, derandomize=True)
@given(st.binary(max_size=2000))
def test_random_bytes_never_raise(data: bytes) -> None:
    report = parse_dsn(
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n" + data
    )
    assert isinstance(report, DeliveryReport)
