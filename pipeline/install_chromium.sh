#!/usr/bin/env bash
# Debian's chromium and chromedriver for the browser tests (make test only: the demo needs no browser).
# Installing them needs root, or sudo without a password; without either, say what to ask for.
set -euo pipefail
if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "make test: the browser tests need Debian's chromium and chromium-driver, and installing them needs root:" \
       "ask an administrator for \`apt-get install chromium chromium-driver\`, then run make test again" >&2
  exit 2
fi
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q chromium chromium-driver
