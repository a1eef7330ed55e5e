#!/usr/bin/env bash
# Headless load test with pass/fail thresholds against a running moe-serve.
#   HOST (default http://127.0.0.1:8000), USERS (32), SPAWN_RATE (8), DURATION (60s),
#   MOE_LOAD_MAX_FAIL_RATIO (0.01), MOE_LOAD_MAX_P99_MS (2000), MOE_LOAD_MODEL (bbc-news-moe)
# Exit code 0 when the thresholds hold, 1 otherwise. CSV stats go to load_tests/results/.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p results
exec locust -f locustfile.py --headless --host "${HOST:-http://127.0.0.1:8000}" \
  --users "${USERS:-32}" --spawn-rate "${SPAWN_RATE:-8}" --run-time "${DURATION:-60s}" \
  --csv results/moe-serve --only-summary
