"""Configuration: a TOML file loaded into frozen dataclasses.

Every default lives here, in the dataclass fields.  Unknown keys, wrong types
and out-of-range values are rejected with an error naming the file and the
key.  The configuration is passed explicitly to whatever needs it; there is
no global instance.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .errors import ConfigError

# The state directory of a system installation, used when it is writable.
SYSTEM_STATE_DIR = "/var/lib/dmarcmilter"
# Where an unprivileged run without a configuration keeps its state,
# relative to the working directory.
LOCAL_STATE_DIR = "state"
HISTORY_FILE = "history.sqlite3"
DATABASE_BACKENDS = ("sqlite", "postgresql", "mysql", "mariadb")


def _opt(
    default: Any,
    *,
    choices: tuple[str, ...] = (),
    minimum: float | None = None,
    maximum: float | None = None,
) -> Any:
    return field(default=default, metadata={"choices": choices, "min": minimum, "max": maximum})


@dataclass(frozen=True)
class DNSConfig:
    # Empty: use the nameservers in /etc/resolv.conf.
    nameservers: tuple[str, ...] = ()
    port: int = _opt(53, minimum=1, maximum=65535)
    # Seconds allowed for one query, and for all the queries of one message.
    timeout: float = _opt(2.0, minimum=0.05, maximum=60)
    budget: float = _opt(8.0, minimum=0.1, maximum=300)
    cache_entries: int = _opt(50_000, minimum=0, maximum=10_000_000)


@dataclass(frozen=True)
class DMARCConfig:
    # "treewalk" is RFC 9989; "psl" is the RFC 7489 compatibility mode.
    discovery_method: str = _opt("treewalk", choices=("treewalk", "psl"))
    # Public Suffix List file for the psl method; empty uses the bundled list.
    psl_file: str = ""


@dataclass(frozen=True)
class SPFConfig:
    # Also evaluate the HELO identity (RFC 7208 §2.3) for Authentication-Results.
    check_helo: bool = True


@dataclass(frozen=True)
class DKIMConfig:
    # Signatures verified per message; the rest are permerror, to bound the work.
    max_signatures: int = _opt(20, minimum=1, maximum=1000)
    min_key_bits: int = _opt(1024, minimum=512, maximum=16384)


@dataclass(frozen=True)
class PolicyConfig:
    # A From field that does not yield exactly one Author Domain (RFC 9989
    # §4.2): "accept" reports dmarc=permerror, "reject" refuses the message.
    out_of_scope: str = _opt("accept", choices=("accept", "reject"))


@dataclass(frozen=True)
class PathsConfig:
    # Empty: /var/lib/dmarcmilter when this process may write there, else
    # ./state, so a first unprivileged run works without configuration.
    state_dir: str = ""


@dataclass(frozen=True)
class DatabaseConfig:
    # SQLAlchemy URL of the history store.  Empty: an SQLite file
    # history.sqlite3 in the state directory.
    url: str = ""


@dataclass(frozen=True)
class Config:
    # The authserv-id of our Authentication-Results; empty: this host's name.
    authserv_id: str = ""
    dns: DNSConfig = field(default_factory=DNSConfig)
    dmarc: DMARCConfig = field(default_factory=DMARCConfig)
    spf: SPFConfig = field(default_factory=SPFConfig)
    dkim: DKIMConfig = field(default_factory=DKIMConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)

    def effective_authserv_id(self) -> str:
        return self.authserv_id or socket.getfqdn()

    def effective_state_dir(self) -> Path:
        if self.paths.state_dir:
            return Path(self.paths.state_dir)
        system = Path(SYSTEM_STATE_DIR)
        if _writable_dir(system):
            return system
        return Path.cwd() / LOCAL_STATE_DIR

    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{self.effective_state_dir() / HISTORY_FILE}"


def _writable_dir(path: Path) -> bool:
    """Whether ``path`` is, or could be created as, a directory we can write."""
    if path.exists():
        return path.is_dir() and os.access(path, os.W_OK | os.X_OK)
    parent = path.parent
    return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)


def parse_database_url(url: str) -> URL:
    """``url`` parsed; ValueError unless it names a supported database."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(f"not a database URL: {url!r}") from None
    backend = parsed.get_backend_name()
    if backend not in DATABASE_BACKENDS:
        raise ValueError(
            f"unsupported database {backend!r}: use sqlite, postgresql, mysql or mariadb"
        )
    return parsed


def load_config(path: str | Path | None) -> Config:
    """Load ``path``, or the defaults when it is None."""
    if path is None:
        return Config()
    source = str(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    return config_from_mapping(data, source)


def config_from_mapping(data: dict[str, Any], source: str = "<config>") -> Config:
    config: Config = _build(Config, data, source, "")
    for server in config.dns.nameservers:
        try:
            ipaddress.ip_address(server)
        except ValueError:
            raise ConfigError(
                f"{source}: dns.nameservers: {server!r} is not an IP address"
            ) from None
    if config.database.url:
        try:
            parse_database_url(config.database.url)
        except ValueError as exc:
            raise ConfigError(f"{source}: database.url: {exc}") from None
    return config


def _build(cls: type[Any], data: dict[str, Any], source: str, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
            raise ConfigError(f"{source}: unknown key '{prefix}{key}' in {where}")
    values: dict[str, Any] = {}
    for name, fld in fields.items():
        if name not in data:
            continue
        key = prefix + name
        hint = hints[name]
        raw = data[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(raw, dict):
                raise ConfigError(f"{source}: {key}: expected a table [{key}]")
            values[name] = _build(typing.cast(type[Any], hint), raw, source, key + ".")
            continue
        values[name] = _convert(raw, hint, fld, source, key)
    return cls(**values)


def _convert(raw: Any, hint: Any, fld: dataclasses.Field[Any], source: str, key: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {key}: expected {expected}, got {raw!r}")

    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            raise bad("a list of strings")
        return tuple(raw)
    if isinstance(hint, types.UnionType):  # pragma: no cover - no such option yet
        raise ConfigError(f"{source}: {key}: unsupported option type")
    if hint is bool:
        if not isinstance(raw, bool):
            raise bad("true or false")
        return raw
    if hint is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise bad("an integer")
        value: Any = raw
    elif hint is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise bad("a number")
        value = float(raw)
    elif hint is str:
        if not isinstance(raw, str):
            raise bad("a string")
        value = raw
    else:  # pragma: no cover - guards against adding an unsupported field type
        raise ConfigError(f"{source}: {key}: unsupported option type")
    meta = fld.metadata
    choices = meta.get("choices") or ()
    if choices and value not in choices:
        raise ConfigError(
            f"{source}: {key}: must be one of {', '.join(repr(c) for c in choices)}, got {raw!r}"
        )
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise ConfigError(f"{source}: {key}: must be at least {lo}, got {raw!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{source}: {key}: must be at most {hi}, got {raw!r}")
    return value
