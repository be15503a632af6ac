"""A container's HEALTHCHECK: ask the running daemon's ``/health``.

``python -m dmarcmilter.healthcheck [CONFIG]`` reads ``[metrics] listen``
from the same configuration file the daemon runs with (so a port changed
there needs no change to the image), asks ``GET /health`` on it, and exits
0 when the answer is 200, 1 otherwise (503: the milter cannot take mail; no
answer: the process is wedged or gone).  A wildcard address is asked on
loopback.  The standard library's urllib only: the image has no curl.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from .config import load_config
from .errors import ConfigError
from .metrics import parse_listen

DEFAULT_CONFIG = "/etc/dmarcmilter/dmarcmilter.toml"
TIMEOUT = 4.0


def url(listen: str) -> str:
    host, port = parse_listen(listen)
    if host == "0.0.0.0":
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}/health" if ":" in host else f"http://{host}:{port}/health"


def main(argv: list[str]) -> int:
    path = argv[0] if argv else DEFAULT_CONFIG
    try:
        listen = load_config(path).metrics.listen
    except ConfigError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    if not listen:
        print("unhealthy: [metrics] listen is not set: no /health to ask", file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(url(listen), timeout=TIMEOUT) as answer:
            print(answer.read().decode(errors="replace").strip())
            return 0 if answer.status == 200 else 1
    except urllib.error.HTTPError as exc:
        with exc:
            print(exc.read().decode(errors="replace").strip(), file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
