# Sourced by demo.sh and test.sh: set up the environment (idempotent) and isolate
# ROS to this run: a DDS domain of its own, discovery on this machine only, and a
# writable log folder. Values already set (as CI sets them) are kept.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NEXTCHAT_VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( $$ % 100 + 1 ))}"
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
# Camera frames over shared memory (Fast DDS's default 512 KB segment loses most
# best-effort 640x480 frames): see the profile's comment.
export FASTDDS_DEFAULT_PROFILES_FILE="${FASTDDS_DEFAULT_PROFILES_FILE:-$ROOT/config/fastdds_large_images.xml}"
export ROS_LOG_DIR="${ROS_LOG_DIR:-$(mktemp -d -t nextchat-ros-log.XXXXXX)}"
