#!/usr/bin/env bash
# The main job: fit ADTR on MVTec bottle, test it, write metrics and heatmaps to runs/bottle.
# DATA defaults to ../shared/data; set ADTR_DATA to use another copy.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${ADTR_DATA:-../shared/data}/mvtec/bottle
RUN=${RUN:-runs/bottle}
.venv/bin/adtr fit "$DATA" --out "$RUN" --force
.venv/bin/adtr test "$RUN" "$DATA" --json "$RUN/metrics.json" --report "$RUN/report"
.venv/bin/adtr predict "$RUN" "$DATA/test" --out "$RUN/predictions" --quiet
echo "metrics: $RUN/metrics.json, report: $RUN/report/index.html, heatmaps: $RUN/predictions/heatmaps"
