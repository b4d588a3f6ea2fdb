#!/usr/bin/env bash
# Installs the headless browser that tests/serve/test_web_page.py drives: Debian's chromium and
# chromium-driver from apt (no browser is downloaded by an installer). Idempotent: when chromium and
# chromedriver are already on PATH it does nothing. Uses sudo when not run as root.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "install_browser.sh: chromium and chromedriver already installed ($(command -v chromium), $(command -v chromedriver))"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "install_browser.sh: need root or sudo to apt-get install chromium chromium-driver" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium chromium-driver

command -v chromium >/dev/null 2>&1 || { echo "install_browser.sh: chromium not on PATH after install" >&2; exit 1; }
command -v chromedriver >/dev/null 2>&1 || { echo "install_browser.sh: chromedriver not on PATH after install" >&2; exit 1; }
echo "install_browser.sh: installed $(chromium --version 2>/dev/null || echo chromium)"
