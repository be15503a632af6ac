"""The one exception hierarchy of dmarcmilter.

Authentication failures are never exceptions: SPF, DKIM, ARC and DMARC report
temperror/permerror as results.  Exceptions are for the caller's mistakes
(bad configuration, unreadable input) and for the DNS time budget running out,
which the checks translate into temperror results where they call DNS.
"""


class DmarcMilterError(Exception):
    """Root of every exception raised by dmarcmilter."""


class ConfigError(DmarcMilterError):
    """The configuration is invalid.  The message names the key and the file."""


class InputError(DmarcMilterError):
    """Input given by a user (a message file, an address, an IP) is unusable."""


class DNSBudgetExceeded(DmarcMilterError):
    """The per-message DNS time budget is spent; further queries are refused.

    Checks translate this into a temperror result at the point of the call.
    """


class DatabaseError(DmarcMilterError):
    """The history database cannot be opened, read or written."""


class SchemaError(DatabaseError):
    """The history database is not at the schema this version needs; the
    message says what to run."""


class ReportError(DmarcMilterError):
    """The report run cannot go on (lost lease, unusable settings)."""


class MissingDependencyError(DmarcMilterError):
    """An optional dependency that the configuration needs is not installed;
    the message names the extra to install.  Not a DatabaseError: a missing
    driver must stop a start, not be taken for a database that is down."""
