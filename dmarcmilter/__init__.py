"""dmarcmilter: RFC 9989 DMARC evaluation and enforcement for Postfix and Sendmail."""

__version__ = "0.1.0"
