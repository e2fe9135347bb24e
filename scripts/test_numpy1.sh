#!/usr/bin/env bash
# The core and message tests in an environment with numpy 1.26, the numpy of ROS 2
# Jazzy (Ubuntu 24.04) and Humble (22.04), whose generated message modules are
# compiled against numpy 1.x: requirements.txt's pins with numpy 1.26.4, in a venv
# of its own (.venv-numpy1), this package's messages generated against it.
# Extra arguments go to pytest. Idempotent, like bootstrap.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NEXTCHAT_NUMPY1_VENV:-$ROOT/.venv-numpy1}"
mkdir -p "$VENV"
requirements="$VENV/requirements-numpy1.txt"
sed -e "s#^-r requirements-runtime.txt#-r $ROOT/requirements-runtime.txt#" -e 's#^numpy==.*#numpy==1.26.4#' \
  "$ROOT/requirements.txt" > "$requirements.new"
cmp -s "$requirements.new" "$requirements" 2>/dev/null || mv "$requirements.new" "$requirements"
rm -f "$requirements.new"
NEXTCHAT_VENV="$VENV" NEXTCHAT_REQUIREMENTS="$requirements" NEXTCHAT_ROS2_TOOLS=/nonexistent \
  bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
"$VENV/bin/python" -c "import numpy, sys; v = numpy.__version__; print('[numpy1] numpy', v); sys.exit(not v.startswith('1.26'))"
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( $$ % 100 + 1 ))}"
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
export FASTDDS_DEFAULT_PROFILES_FILE="${FASTDDS_DEFAULT_PROFILES_FILE:-$ROOT/config/fastdds_large_images.xml}"
export ROS_LOG_DIR="${ROS_LOG_DIR:-$(mktemp -d -t nextchat-ros-log.XXXXXX)}"
echo "[numpy1] pytest: core and message tests (the node's load test is the main suite's)"
exec "$VENV/bin/python" -m pytest tests/test_inputs.py tests/test_predictor.py tests/test_service.py \
  tests/test_queries.py tests/test_ros_interfaces.py tests/test_node_parameters.py tests/test_node.py \
  tests/test_bag.py --deselect tests/test_node.py::test_a_30hz_camera_does_not_starve_queries "$@"
