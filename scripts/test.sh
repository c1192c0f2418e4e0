#!/usr/bin/env bash
# Set up (idempotent: setup.sh, then setup_browser.sh for the browser tests) and run the whole
# test suite. Arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$repo/scripts/setup_browser.sh" | tail -n 1)"
cd "$repo"
exec "$py" -m pytest "$@"
