"""The one log line per message, as logfmt or JSON.

Field names follow RFC 8601/9989 vocabulary so a log search reads like an
Authentication-Results field: header_from, policy_domain, spf, dkim, dmarc,
policy, disposition, action.
"""

from __future__ import annotations

import json
import re
from typing import Any

_BARE = re.compile(r"^[A-Za-z0-9_.@:/+=\-\[\]]+$")


def logfmt(fields: dict[str, Any]) -> str:
    """``key=value`` pairs; values with spaces, quotes or nothing are quoted."""
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        text = _text(value)
        if not _BARE.match(text):
            text = json.dumps(text, ensure_ascii=False)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def json_line(fields: dict[str, Any]) -> str:
    return json.dumps(
        {k: v for k, v in fields.items() if v is not None},
        ensure_ascii=False,
        separators=(",", ":"),
        default=str,
    )


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.1f}"
    # Values from the wire may hold surrogates; never let a log line fail.
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")
