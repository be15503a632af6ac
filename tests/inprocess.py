"""The milter object driven in-process, callback by callback.

libmilter cannot be run inside the test process, so :class:`MilterContext`
stands in for the few context methods the milter calls, recording each
call and refusing what pymilter and libmilter refuse.  Everything else is
the real milter code.
"""

from __future__ import annotations

from typing import Any

import Milter


class MilterContext:
    """The few libmilter context methods the milter calls, recording each
    call.  Like pymilter's, they refuse text that cannot go on the wire."""

    def __init__(self, macros: dict[str, str]) -> None:
        self.macros = macros
        self.calls: list[tuple[Any, ...]] = []

    def getsymval(self, name: str) -> str | None:
        return self.macros.get(name)

    @staticmethod
    def _wire(*texts: str | None) -> None:
        # UnicodeEncodeError on a lone surrogate, as pymilter; libmilter
        # refuses NUL and a field longer than its 64 KiB buffer.
        for text in texts:
            if text is not None and ("\0" in text or len(text.encode("utf-8")) > 65535):
                raise Milter.error("cannot send")

    def addheader(self, name: str, value: str, index: int = -1) -> None:
        self._wire(name, value)
        self.calls.append(("addheader", name, value, index))

    def chgheader(self, name: str, index: int, value: str | None) -> None:
        self._wire(name, value)
        assert index >= 1
        self.calls.append(("chgheader", name, index, value))

    def quarantine(self, reason: str) -> None:
        self._wire(reason)
        self.calls.append(("quarantine", reason))

    def setreply(self, code: str, xcode: str | None, text: str | None, *lines: str) -> None:
        self._wire(code, xcode, text)
        self.calls.append(("setreply", code, xcode, text))

    def setpriv(self, obj: object) -> None:
        pass
