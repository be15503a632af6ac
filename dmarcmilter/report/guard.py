"""The loop guard: our own aggregate report mail is never recorded.

Report mail passes through MTAs, often one with this milter on it.  If it
were recorded, the next run would report on the reports, and two reporters
that send each other reports would keep each other busy for ever.  Report
mail is evaluated and marked like any other message; only its history row
is left out.

A message is ours when its From is ``report.from_address`` and its
Message-ID is the one :mod:`dmarcmilter.report.mail` gives a report,
``<report-id.token@submitter>``
(or ``<report-id@submitter>``).  Someone forging both only keeps their message
out of our reports about our own reporting domain.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..config import Config

# A report id is alphanumeric (the filename's unique-id, digest §6.3),
# followed by the delivery's alphanumeric token when it has one.
_MESSAGE_ID = re.compile(r"\s*<([A-Za-z0-9]+(?:\.[A-Za-z0-9]+)?)@([^<>@\s]+)>\s*")
_ADDRESS = re.compile(r"<([^<>]*)>")


def is_own_report(headers: Sequence[tuple[str, str]], config: Config) -> bool:
    """Whether the message with these header fields is our report mail."""
    from_address = config.report.from_address
    if not from_address:
        return False
    from_values = [v for n, v in headers if n.lower() == "from"]
    ids = [v for n, v in headers if n.lower() == "message-id"]
    if len(from_values) != 1 or len(ids) != 1:
        return False
    return _from_is(from_values[0], from_address) and _ours(ids[0], config, token=False)


def is_report_message_id(value: str, config: Config) -> bool:
    """Whether ``value`` has the form of one of our report mails'
    Message-IDs with a delivery token, ``<report-id.token@submitter>``: a
    bounce naming anything else cannot be of our report mail.  (Only the
    report job, which knows the tokens, can tell a real one.)"""
    return _ours(value, config, token=True)


def _ours(value: str, config: Config, *, token: bool) -> bool:
    match = _MESSAGE_ID.fullmatch(value)
    if match is None or (token and "." not in match.group(1)):
        return False
    submitter = (config.report.submitter or config.effective_authserv_id()).lower().rstrip(".")
    return match.group(2).lower().rstrip(".") == submitter


def _from_is(value: str, address: str) -> bool:
    found = _ADDRESS.findall(value)
    mailbox = found[-1] if found else value
    local, _, domain = mailbox.strip().rpartition("@")
    want_local, _, want_domain = address.rpartition("@")
    return local == want_local and domain.lower().rstrip(".") == want_domain.lower().rstrip(".")
