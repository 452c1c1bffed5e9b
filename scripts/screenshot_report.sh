#!/usr/bin/env bash
# Render a report's index.html in headless Chromium (Debian package `chromium`) and save a screenshot.
#   scripts/screenshot_report.sh REPORT_DIR [OUT.png]
# Also prints how many table rows and images the rendered DOM has, as a check that the page renders.
set -euo pipefail
dir=$(cd "$1" && pwd)
out=${2:-$dir/screenshot.png}
browser=$(command -v chromium || command -v chromium-browser || true)
[ -n "$browser" ] || { echo "chromium not found: apt-get install chromium" >&2; exit 2; }
flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking
       --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)")
"$browser" "${flags[@]}" --window-size=1200,2600 --screenshot="$out" "file://$dir/index.html" >/dev/null 2>&1
dom=$("$browser" "${flags[@]}" --dump-dom "file://$dir/index.html" 2>/dev/null)
rows=$(grep -o "<tr>" <<<"$dom" | wc -l)
imgs=$(grep -o "<img " <<<"$dom" | wc -l)
echo "screenshot: $out (table rows incl. header: $rows, images: $imgs)"
[ "$rows" -ge 2 ] && [ "$imgs" -ge 1 ]
