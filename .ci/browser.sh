#!/usr/bin/env bash
# What tests/e2e/test_browser.py needs on a fresh Debian machine (run as root): Debian's Chromium at
# /usr/bin/chromium and Playwright for Python, which drives it. Only Playwright's Python package and its driver are
# installed; `playwright install` (a browser download) is never run. Idempotent: seconds when both are present.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
CHROMIUM=/usr/bin/chromium

if [ ! -x "$CHROMIUM" ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "browser.sh: no apt-get here; install Chromium at $CHROMIUM by hand" >&2
        exit 1
    fi
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
            echo "browser.sh: installing Chromium needs root" >&2
            exit 1
        fi
    fi
    echo "browser.sh: installing Debian's chromium"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

if ! "$PYTHON" -c "import playwright.sync_api" >/dev/null 2>&1; then
    echo "browser.sh: installing Playwright for Python"
    "$PYTHON" -m pip install -q --disable-pip-version-check -c "$(dirname "$0")/../constraints.txt" playwright
fi

# Debian's wrapper script may print a shell warning before the version; keep the version line only.
echo "browser.sh: $("$CHROMIUM" --version 2>/dev/null | tail -n 1); playwright $("$PYTHON" -c \
    'import importlib.metadata as m; print(m.version("playwright"))')"
