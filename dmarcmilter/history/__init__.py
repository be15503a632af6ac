"""The history store: every evaluated message, kept for aggregate reports.

``models`` is the schema and ``migrations`` the Alembic scripts shipped with
the package; ``db`` opens, migrates, checks and prunes the database.  On the
way in, ``rows`` converts an evaluation into a row, ``writer`` queues and
stores rows in batches (``bulk``), with each row first appended to the
``journal`` so that no row is lost while the database is down or the process
is killed.  On the way out, ``reader`` groups them into
RFC 9990 report records.
"""
