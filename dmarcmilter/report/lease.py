"""The fleet lease: one report run at a time across hosts sharing one
history database (RFC 9990 §2.1, digest §6.1: one report per policy domain
and period, and never a report sent twice).

Every MX host of a fleet may run ``dmarcmilter report`` from its timer.  The
run holds the ``leases`` row, renewed while it works; a second host finds it
held and leaves.  A run that dies leaves the row behind, and the next run
takes it over once it has expired.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import socket
from collections.abc import Callable
from typing import cast

from sqlalchemy import Table, delete, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from ..errors import ReportError
from ..history.models import LeaseRow

LEASES = cast(Table, LeaseRow.__table__)

LEASE_NAME = "report-run"
LEASE_TTL = dt.timedelta(minutes=10)


class Lease:
    """The fleet lease (``leases`` row): at most one holder until it
    expires; the holder renews it as it works."""

    def __init__(
        self, engine: Engine, name: str, holder: str, clock: Callable[[], dt.datetime]
    ) -> None:
        self.engine = engine
        self.name = name
        self.holder = holder
        self.clock = clock
        self.renewed_at: dt.datetime | None = None

    def acquire(self) -> str | None:
        """None when acquired, else who holds it."""
        now = self.clock()
        table = LEASES
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(table).values(
                        name=self.name, holder=self.holder, expires_at=now + LEASE_TTL
                    )
                )
        except IntegrityError:
            # Held, or left behind by a run that died: take it over only
            # once it has expired.  One UPDATE, so two hosts cannot both win.
            with self.engine.begin() as conn:
                taken = conn.execute(
                    update(table)
                    .where(table.c.name == self.name, table.c.expires_at < now)
                    .values(holder=self.holder, expires_at=now + LEASE_TTL)
                ).rowcount
                if taken != 1:
                    holder = conn.execute(
                        select(table.c.holder).where(table.c.name == self.name)
                    ).scalar()
                    return str(holder or "another host")
        self.renewed_at = now
        return None

    def renew(self, force: bool = False) -> None:
        now = self.clock()
        if not force and self.renewed_at and now - self.renewed_at < LEASE_TTL / 3:
            return
        table = LEASES
        with self.engine.begin() as conn:
            kept = conn.execute(
                update(table)
                .where(table.c.name == self.name, table.c.holder == self.holder)
                .values(expires_at=now + LEASE_TTL)
            ).rowcount
        if kept != 1:
            raise ReportError(
                f"lost the {self.name} lease (stalled for over {LEASE_TTL}); "
                "another host may be running reports"
            )
        self.renewed_at = now

    def release(self) -> None:
        table = LEASES
        with self.engine.begin() as conn:
            conn.execute(
                delete(table).where(table.c.name == self.name, table.c.holder == self.holder)
            )


def host_identity() -> str:
    """This process, for the lease and the reports table: unique even for
    two runs on one host."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


__all__ = ["LEASE_NAME", "LEASE_TTL", "Lease", "host_identity"]
