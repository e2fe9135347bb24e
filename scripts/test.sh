#!/usr/bin/env bash
# The whole test suite, as CI runs it: set up the environment (idempotent),
# lint with ruff, then pytest. Extra arguments go to pytest, e.g.
#   scripts/test.sh -k predictor -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NEXTCHAT_VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"

# ROS isolation for the tests' real rclpy graphs: a domain of this run's own,
# discovery on this machine only, and a writable log folder.
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( $$ % 100 + 1 ))}"
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
export ROS_LOG_DIR="${ROS_LOG_DIR:-$(mktemp -d -t nextchat-ros-log.XXXXXX)}"

echo "[test] ruff check"
"$VENV/bin/ruff" check .
echo "[test] pytest (ROS_DOMAIN_ID=$ROS_DOMAIN_ID)"
exec "$VENV/bin/python" -m pytest "$@"
