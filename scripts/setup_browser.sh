#!/usr/bin/env bash
# Idempotent environment for the browser tests (tests/browser) and scripts/screenshot_workflows.py,
# on top of scripts/setup.sh: Debian's chromium package and the playwright Python driver in the
# project's venv. Playwright's own browser download (`playwright install`) is never used.
#
#   bash scripts/setup_browser.sh    # prints the venv's python at the end, as setup.sh does
#
# - Chromium: $CONSISTENT_STORY_CHROMIUM, default /usr/bin/chromium; when absent, apt-get installs
#   chromium (and a font), as root or through sudo, refreshing the package lists only if needed.
# A second run only checks that both are there and takes seconds.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
chromium="${CONSISTENT_STORY_CHROMIUM:-/usr/bin/chromium}"
say() { printf '[setup_browser] %s\n' "$*" >&2; }

py="$(bash "$repo/scripts/setup.sh" | tail -n 1)"

if [ ! -x "$chromium" ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    say "no Chromium at $chromium and no apt-get: install Chromium, then set CONSISTENT_STORY_CHROMIUM to its executable."
    exit 1
  fi
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
  packages=(chromium fonts-dejavu-core)
  say "installing Debian's ${packages[*]} (about 100 MB, once)"
  export DEBIAN_FRONTEND=noninteractive
  if ! "${sudo[@]}" apt-get install -y -q --no-install-recommends "${packages[@]}" >&2; then
    say "refreshing apt's package lists and trying again"
    "${sudo[@]}" apt-get update -q >&2
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${packages[@]}" >&2
  fi
  [ -x "$chromium" ] || { say "apt-get installed chromium, but $chromium is still missing: set CONSISTENT_STORY_CHROMIUM."; exit 1; }
fi

if ! "$py" -c 'import playwright.sync_api' 2>/dev/null; then
  say "installing the playwright driver into $("$py" -c 'import sys; print(sys.prefix)')"
  "$py" -m pip install --quiet -r "$repo/tests/browser/requirements.txt"
fi
echo "$py"
