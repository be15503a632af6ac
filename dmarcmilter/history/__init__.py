"""The history store: every evaluated message, kept for aggregate reports.

``models`` is the schema, ``rows`` converts an evaluation into the row the
writer stores, ``db`` opens, migrates, checks and prunes the database, and
``migrations`` holds the Alembic scripts shipped with the package.
"""
