#!/usr/bin/env bash
# Install everything the tests need, then run them:  bash tests/run.sh [pytest arguments]
#  - as root on Debian/Ubuntu: Dovecot (imapd, pop3d, submissiond, Lua auth), swaks, curl, fetchmail,
#    getmail6, Chromium and its driver, debootstrap, buildah and podman (the container test) from apt
#  - a virtualenv in .venv with the package and its [test] extras from PyPI
# Integration tests never skip silently: without Dovecot they fail.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(dovecot-imapd dovecot-submissiond dovecot-auth-lua swaks curl ca-certificates
              systemd  # systemd-analyze verify for contrib/oauth2-mail-proxy.service (issue 13)
              tinyproxy  # a real web proxy (HTTP CONNECT) for the identity provider and the upstreams (issue 13)
              dovecot-pop3d fetchmail getmail6  # POP3: the upstream's service and two real clients (issue 16)
              postgresql haproxy  # replicas on a shared PostgreSQL token store behind a TCP balancer (issue 14)
              chromium chromium-driver  # a real headless browser for the sign-in test (issue 4)
              debootstrap buildah podman)  # build and run the container image (tests/test_container.py)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "tests/run.sh: installing ${missing[*]}"
        apt-get -o DPkg::Lock::Timeout=900 update -qq
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
exec .venv/bin/python -m pytest "$@"
