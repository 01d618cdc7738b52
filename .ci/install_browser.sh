#!/usr/bin/env bash
# What the feedback app's tests need: Django and friends (the [feedback] extra plus test tools)
# and Debian's Chromium for the Playwright browser test. Playwright never downloads a browser here.
set -euo pipefail
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && ! [ -x /usr/bin/chromium ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-liberation
fi
pip install -q "django==5.2.19" "waitress==3.0.2" "pytest-django==4.14.0" "playwright==1.65.2" "pytest-playwright==0.10.0" pillow
