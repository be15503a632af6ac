#!/bin/sh
# The entry point on a fresh machine: ./dev.sh run | test | demo | bench | ...
#
# It installs make when it is missing (the one thing a bare Debian or Ubuntu
# lacks to read the Makefile), then hands the target to make, which installs
# everything else it needs.  Safe to run again after an interruption.
set -eu
cd "$(dirname "$0")"
if ! command -v make >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
        echo "dev.sh: make is not installed; run this once as root, or: apt-get install make" >&2
        exit 1
    fi
    echo "installing make"
    # A previous install that was interrupted leaves dpkg half-configured.
    dpkg --configure -a
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq make >/dev/null
fi
exec make --no-print-directory "$@"
