"""Configuration loading: defaults, and precise errors naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmarcmilter.config import Config, load_config
from dmarcmilter.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dmarcmilter.toml"
    path.write_text(text)
    return path


def test_no_file_gives_defaults() -> None:
    config = load_config(None)
    assert config == Config()
    assert config.dmarc.discovery_method == "treewalk"
    assert config.dns.port == 53


def test_shipped_example_config_loads_and_equals_defaults() -> None:
    # etc/dmarcmilter.toml documents every option with its default value.
    config = load_config(ROOT / "etc" / "dmarcmilter.toml")
    assert config == Config()


def test_values_are_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'authserv_id = "mx.example"\n[dns]\nnameservers = ["127.0.0.1"]\nport = 5353\n'
        'timeout = 1\n[dmarc]\ndiscovery_method = "psl"\n',
    )
    config = load_config(path)
    assert config.authserv_id == "mx.example"
    assert config.dns.nameservers == ("127.0.0.1",)
    assert config.dns.port == 5353 and config.dns.timeout == 1.0
    assert config.dmarc.discovery_method == "psl"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus = 1\n", "unknown key 'bogus' in the top level"),
        ("[dns]\nprot = 53\n", "unknown key 'dns.prot' in [dns]"),
        ("[nosuch]\nx = 1\n", "unknown key 'nosuch' in the top level"),
        ('[dns]\nport = "53"\n', "dns.port: expected an integer, got '53'"),
        ("[dns]\nport = 0\n", "dns.port: must be at least 1, got 0"),
        ("[dns]\nport = 70000\n", "dns.port: must be at most 65535, got 70000"),
        ("[dns]\ntimeout = true\n", "dns.timeout: expected a number, got True"),
        ('[dns]\nnameservers = "127.0.0.1"\n', "dns.nameservers: expected a list of strings"),
        ('[dns]\nnameservers = ["ns.example"]\n', "dns.nameservers: 'ns.example' is not an IP"),
        ('[dmarc]\ndiscovery_method = "dns"\n', "dmarc.discovery_method: must be one of"),
        ("[spf]\ncheck_helo = 1\n", "spf.check_helo: expected true or false, got 1"),
        ("dns = 5\n", "dns: expected a table [dns]"),
        ("[dns\n", "invalid TOML"),
        ('[milter]\nsocket = "8893"\n', "milter.socket: expected inet:PORT@HOST"),
        ('[milter]\nsocket = "tcp:25@1.2.3.4"\n', "milter.socket: unknown socket type 'tcp'"),
        ('[milter]\nsocket = "inet:99999@127.0.0.1"\n', "milter.socket: port must be a number"),
        ('[milter]\nsocket = "inet:25@localhost"\n', "milter.socket: the host must be an IP"),
        ('[milter]\nsocket = "inet6:25@127.0.0.1"\n', "milter.socket: inet6 needs an IPv6"),
        ('[milter]\nsocket = "unix:relative.sock"\n', "milter.socket: a unix socket needs an"),
        ('[milter]\nsocket_mode = "rw"\n', "milter.socket_mode: expected an octal mode"),
        ("[milter]\nmax_body_bytes = 10\n", "milter.max_body_bytes: must be at least 1024"),
        (
            '[clients]\ntrusted_networks = ["10.0.0.0/33"]\n',
            "clients.trusted_networks: '10.0.0.0/33'",
        ),
        ('[clients]\ntrusted_networks = ["mx.example"]\n', "is not a network in CIDR notation"),
        ('[policy]\nquarantine_action = "drop"\n', "policy.quarantine_action: must be one of"),
        (
            '[policy]\nquarantine_header = "X-Spam"\n',
            "policy.quarantine_header: expected 'Name: value'",
        ),
        (
            '[policy]\nquarantine_header = "X Spam: yes"\n',
            "'X Spam' is not a valid header field name",
        ),
        ('[policy]\nreject_text = "100% spam"\n', "policy.reject_text: must be printable ASCII"),
        (
            '[policy]\nreject_text = "for {dom}"\n',
            "policy.reject_text: the only placeholder allowed",
        ),
        ('[policy]\ntempfail_text = ""\n', "policy.tempfail_text: must be printable ASCII"),
        ('[policy]\ntemperror_action = "defer"\n', "policy.temperror_action: must be one of"),
        ('[policy]\nenforce_reject_domains = ["a b"]\n', "policy.enforce_reject_domains: 'a b'"),
        ('[log]\nformat = "text"\n', "log.format: must be one of 'logfmt', 'json'"),
        ('[log]\nsyslog_facility = "kern"\n', "log.syslog_facility: must be one of"),
        ('[headers]\nreceived_spf = "yes"\n', "headers.received_spf: expected true or false"),
        ('[report]\nfrom_address = "reports"\n', "report.from_address: expected an address"),
        (
            '[report]\nfrom_address = "a b@example.com"\n',
            "report.from_address: 'a b@example.com' has characters that cannot appear",
        ),
        ('[report]\nemail = "x@bad..example"\n', "report.email: 'bad..example' is not a"),
        ('[report]\nsubmitter = "mx example"\n', "report.submitter: 'mx example' is not a"),
        ('[report]\nformat = "json"\n', "report.format: must be one of 'rfc9990', 'rfc7489'"),
        ("[report]\nmax_uris = 0\n", "report.max_uris: must be at least 1"),
        ('[report]\nsmtp_starttls = "yes"\n', "report.smtp_starttls: must be one of"),
        ('[report]\ntransport = "lmtp"\n', "report.transport: must be one of"),
        ('[report]\norg_name = "a\\nb"\n', "report.org_name: must be one line"),
        (
            '[report]\nsmtp_password = "x"\nsmtp_password_file = "/etc/p"\n',
            "report.smtp_password_file: set smtp_password or smtp_password_file, not both",
        ),
        (
            'authserv_id = "mx.example"\n[headers]\ntrusted_authserv_ids = ["MX.example."]\n'
            'trusted_upstream_networks = ["10.0.0.0/8"]\n',
            "headers.trusted_authserv_ids: 'MX.example.' is also an authserv-id of ours",
        ),
        (
            '[headers]\ntrusted_authserv_ids = ["relay.example"]\n',
            "headers.trusted_upstream_networks: required when headers.trusted_authserv_ids",
        ),
        (
            '[headers]\ntrusted_authserv_ids = ["relay.example"]\n'
            'trusted_upstream_networks = ["10.0.0.300/8"]\n',
            "headers.trusted_upstream_networks: ",
        ),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")


def test_socket_specs() -> None:
    from dmarcmilter.config import parse_socket

    assert parse_socket("inet:8893@127.0.0.1").libmilter == "inet:8893@127.0.0.1"
    assert parse_socket("inet6:8893@[::1]").libmilter == "inet6:8893@::1"
    assert parse_socket("inet:8893").libmilter == "inet:8893@0.0.0.0"
    unix = parse_socket("local:/run/dmarcmilter/milter.sock")
    assert (unix.family, unix.libmilter) == ("unix", "unix:/run/dmarcmilter/milter.sock")


def test_container_config_loads() -> None:
    config = load_config(ROOT / "docker" / "dmarcmilter.toml")
    assert config.milter.socket == "inet:8893@0.0.0.0"
    assert config.paths.state_dir == "/var/lib/dmarcmilter"
