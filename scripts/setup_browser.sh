#!/usr/bin/env bash
# Installs what the chat-page test (tests/serve/test_page.py) drives: Debian's Chromium and
# ChromeDriver, and selenium in .venv. Idempotent; no browser download from anywhere else
# (selenium is pointed at /usr/bin/chromedriver, so Selenium Manager never fetches one).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver >/dev/null
fi
.venv/bin/python -c "import selenium" 2>/dev/null || .venv/bin/pip install -q -c constraints.txt "selenium>=4.20"
chromium --version
chromedriver --version
