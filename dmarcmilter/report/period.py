"""Which period a report covers (RFC 9990 §2.1 ``date_range``; digest §6.1).

Periods are UTC, ``[begin, end)`` on whole seconds, and by default one UTC
day from 00:00Z, which RFC 9990 calls typical and RFC 7489 asked for.  The
report's ``date_range`` names the period, not its first and last message,
and ends on the period's last second (RFC 9990's example: begin + 86399).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

DAY = dt.timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Period:
    """A reporting period, ``[begin, end)`` in UTC.  The report's
    date_range ends on its last second (RFC 9990's example: begin + 86399)."""

    begin: dt.datetime
    end: dt.datetime

    def __post_init__(self) -> None:
        for value in (self.begin, self.end):
            if value.utcoffset() is None:
                raise ValueError(f"period bounds must be aware datetimes, not {value}")
            if value.microsecond:
                raise ValueError(f"period bounds must be whole seconds, not {value.isoformat()}")
        if self.end <= self.begin:
            raise ValueError(
                f"empty period: {self.end.isoformat()} is not after {self.begin.isoformat()}"
            )

    @property
    def begin_ts(self) -> int:
        return int(self.begin.timestamp())

    @property
    def end_ts(self) -> int:
        return int(self.end.timestamp()) - 1

    @classmethod
    def day(cls, day: dt.date) -> Period:
        begin = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
        return cls(begin, begin + DAY)

    @classmethod
    def last_complete_day(cls, now: dt.datetime) -> Period:
        return cls.day((now.astimezone(dt.UTC) - DAY).date())


__all__ = ["DAY", "Period"]
