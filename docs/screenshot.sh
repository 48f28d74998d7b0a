#!/usr/bin/env bash
# Open a run's report.html in headless Chromium, fail on any page error, and save a screenshot.
#   docs/screenshot.sh RUN_DIR [OUT.png]     (default OUT: docs/report.png)
# Needs Debian's chromium (apt-get install chromium). Nothing is fetched: the page is self-contained.
set -euo pipefail
run_dir=${1:?usage: docs/screenshot.sh RUN_DIR [OUT.png]}
out=${2:-$(dirname "$0")/report.png}
page=$(realpath "$run_dir/report.html")
profile=$(mktemp -d)
log=$(mktemp)
trap 'rm -rf "$profile" "$log"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
  --enable-logging=stderr --v=0 --window-size=1280,6400 --screenshot="$out" "file://$page" 2>"$log" >/dev/null
if grep -E "CONSOLE|Uncaught|Failed to load resource" "$log"; then
  echo "report.html: the page reported errors (above)" >&2
  exit 1
fi
echo "opened $page without page errors; screenshot: $out"
