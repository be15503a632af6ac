"""Aggregate reports (RFC 9990): from the history store to delivered mail.

``model`` is the report as data; ``xml`` writes it in the RFC 9990 (or the
RFC 7489) format; ``mail`` wraps it in the report message; ``destinations``
verifies the rua URIs a policy asks for (RFC 9990 §4.4 / digest §6.4);
``period`` is the span a report covers; ``aggregate`` builds and stores the
reports; ``outbox`` delivers stored reports, with retries and the
per-destination rate limit; ``delivery`` holds the transports that send the
mail; ``lease`` keeps a fleet to one run at a time; ``job`` runs the whole
job, as the ``dmarcmilter report`` command does.
"""
