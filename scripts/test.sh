#!/usr/bin/env bash
# The whole test suite, as CI runs it: set up the environment (idempotent),
# lint with ruff, then pytest. Extra arguments go to pytest, e.g.
#   scripts/test.sh -k predictor -x
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ros_env.sh"
echo "[test] ruff check"
"$VENV/bin/ruff" check .
echo "[test] pytest (ROS_DOMAIN_ID=$ROS_DOMAIN_ID)"
exec "$VENV/bin/python" -m pytest "$@"
