#!/usr/bin/env bash
# Set up the environment (scripts/setup.sh) and run the example comic workflow headless.
#
#   bash scripts/run_example.sh                  # "workflows/Consistent Story - Comic page (SD1.5).json"
#   bash scripts/run_example.sh --workflow "workflows/Consistent Story - Four-panel strip (SDXL).json" --full
#   bash scripts/run_example.sh --story s.txt --panels 10   # redraw panel 10, pages written again
#
# Arguments go to scripts/run_example.py (see --help); its last line is the saved page's path.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$repo/scripts/setup.sh" | tail -n 1)"
exec "$py" "$repo/scripts/run_example.py" "$@"
