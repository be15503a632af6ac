"""Aggregate reports (RFC 9990): from the history store to delivered mail.

``model`` is the report as data; ``xml`` writes it in the RFC 9990 (or the
RFC 7489) format; ``mail`` wraps it in the report message; ``destinations``
verifies the rua URIs a policy asks for (RFC 9990 §4.4 / digest §6.4);
``delivery`` sends the messages; ``generate`` runs the whole job, as the
``dmarcmilter report`` command does.
"""
