"""Message parsing: stored files and milter parts become the same CRLF bytes."""

from __future__ import annotations

import tracemalloc

import pytest

from dmarcmilter.errors import InputError
from dmarcmilter.message import Message, MessageBuffer


def test_lf_file_becomes_crlf_and_keeps_folding() -> None:
    msg = Message.from_bytes(b"From: a@example.com\nSubject: one\n two\n\nbody\nline\n")
    assert msg.headers == (("From", "a@example.com"), ("Subject", "one\r\n two"))
    assert msg.raw == b"From: a@example.com\r\nSubject: one\r\n two\r\n\r\nbody\r\nline\r\n"


def test_crlf_file_is_unchanged() -> None:
    raw = b"From: a@example.com\r\nTo: b@example.net\r\n\r\nhello\r\n"
    assert Message.from_bytes(raw).raw == raw


def test_mbox_separator_is_dropped() -> None:
    msg = Message.from_bytes(
        b"From sender@example.com Mon Jan 1 00:00:00 2024\nFrom: a@x.org\n\nb\n"
    )
    assert msg.header_values("from") == ["a@x.org"]


def test_headers_only_message() -> None:
    msg = Message.from_bytes(b"From: a@example.com\r\n")
    assert msg.headers == (("From", "a@example.com"),)


def test_utf8_header_survives() -> None:
    msg = Message.from_bytes("From: Jörg <j@bücher.example>\n\nx\n".encode())
    assert msg.headers[0][1] == "Jörg <j@bücher.example>"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\n\nbody only\n",
        b"this is not a header\n\nbody",
        b" continuation first: x\n\n",
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
        b"From: a@example.com\nX-Bad: a\x00b\n\n",
    ],
)
def test_not_a_message(data: bytes) -> None:
    with pytest.raises(InputError, match="not an RFC 5322 message"):
        Message.from_bytes(data)


def test_from_parts_matches_from_bytes() -> None:
    parts = Message.from_parts(
        [("From", "a@example.com"), ("Subject", "one\n two")], b"body\nline\n"
    )
    stored = Message.from_bytes(b"From: a@example.com\nSubject: one\n two\n\nbody\nline\n")
    assert parts.raw == stored.raw


def test_message_buffer_joins_chunks_as_one_body() -> None:
    # Line endings are made CRLF across chunk boundaries, a CR at the end of
    # a chunk waiting for the next: the same bytes as the body in one piece.
    body = b"one\r\ntwo\nthree\r\rfour\r\n\rfive\r"
    expected = Message.from_parts([("From", "a@example.com")], body).raw
    assert expected.endswith(b"\r\n\r\none\r\ntwo\r\nthree\r\rfour\r\n\rfive\r")
    for cut in range(len(body) + 1):
        for second in range(cut, len(body) + 1):
            buffer = MessageBuffer([("From", "a@example.com")])
            for chunk in (body[:cut], body[cut:second], body[second:]):
                buffer.write(chunk)
            message = buffer.message()
            assert message.raw == expected and type(message.raw) is bytes
            assert message.headers == (("From", "a@example.com"),)


def test_message_buffer_keeps_leading_space_values() -> None:
    buffer = MessageBuffer([("Subject", " hi\n there")], leading_space=True)
    buffer.write(b"x\r\n")
    message = buffer.message()
    assert message.raw == b"Subject: hi\r\n there\r\n\r\nx\r\n"
    assert message.headers == (("Subject", "hi\n there"),)


def test_message_buffer_holds_a_large_body_once() -> None:
    chunk = b"x" * 78 + b"\r\n"
    chunks = 16 * 1024 * 1024 // (len(chunk) * 800)
    tracemalloc.start()
    try:
        buffer = MessageBuffer([("From", "a@example.com")])
        for _ in range(chunks):
            buffer.write(chunk * 800)
        message = buffer.message()
        del buffer
        size = len(message.raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The buffer grows in place and becomes the message's bytes; its
    # over-allocation while growing is the only extra.
    assert size > 15 * 1024 * 1024
    assert peak < 1.3 * size
