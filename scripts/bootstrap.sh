#!/usr/bin/env bash
# Sets up (or refreshes) the quick-start environment: a venv with the pinned
# packages from requirements.txt, this package's ROS interfaces generated into it
# (rosidl, no ROS install needed), and nextchat_ros installed in editable mode.
#
# Idempotent: each step runs only when its inputs changed since the last run
# (hashes kept in $VENV/.nextchat-stamps). Safe to run again at any time.
#
#   NEXTCHAT_VENV   where the venv lives (default: <repo>/.venv)
#   PYTHON          the interpreter to build the venv from (default: python3)
#   NEXTCHAT_REQUIREMENTS  the pinned requirements file (default: <repo>/requirements.txt;
#                   scripts/test_numpy1.sh gives a copy with numpy 1.26)
#   NEXTCHAT_ROS2_TOOLS  a folder with the ROS 2 tooling PyPI lacks (launch, ros2cli,
#                   vision_msgs) and its install.sh (default: <repo>/../shared/ros2,
#                   where CI has it); without it `ros2 launch` and the tests that
#                   run it are skipped
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NEXTCHAT_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
STAMPS="$VENV/.nextchat-stamps"
REQUIREMENTS="${NEXTCHAT_REQUIREMENTS:-$ROOT/requirements.txt}"
T0=$SECONDS

say() { printf '[bootstrap %3ds] %s\n' "$((SECONDS - T0))" "$*"; }
hash_of() { (cd "$ROOT" && cat "$@" | sha256sum | cut -c1-16); }
stamp_ok() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
stamp_set() { mkdir -p "$STAMPS"; echo "$2" > "$STAMPS/$1"; }
# pip prints one warning per package for absent local mirrors; keep real output.
quiet_pip() { "$VENV/bin/python" -m pip "$@" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true; }

# 1. The venv.
if [ ! -x "$VENV/bin/python" ]; then
  say "creating venv $VENV ($("$PYTHON" --version))"
  "$PYTHON" -m venv "$VENV"
fi

# 2. Pinned packages.
req_hash=$(hash_of "$REQUIREMENTS" requirements-runtime.txt)
if ! stamp_ok requirements "$req_hash"; then
  say "installing pinned packages from $(basename "$REQUIREMENTS") (first time: ~2 min, torch is 5 GB)"
  quiet_pip install -q --disable-pip-version-check -r "$REQUIREMENTS"
  "$VENV/bin/python" -c "import torch, torchvision, segment_anything, transformers, rclpy, onnxruntime" \
    || { say "ERROR: the pinned packages do not import; see pip's output above"; exit 1; }
  # The ROS wheels' CMake exports name the wheel builder's Python and numpy
  # include folders; point them at this venv's so rosidl can compile against them.
  py_inc=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  np_inc=$("$VENV/bin/python" -c "import numpy; print(numpy.get_include())")
  for f in "$VENV"/share/*/cmake/export_*__rosidl_generator_pyExport.cmake; do
    sed -i -E "s#/opt/python/cp311-cp311/include/python3\.11#${py_inc}#g; s#/opt/python/cp311-cp311/lib/python3\.11/site-packages/numpy/_core/include#${np_inc}#g" "$f"
  done
  stamp_set requirements "$req_hash"
  rm -f "$STAMPS/interfaces"  # rebuild interfaces against the new packages
fi

# 3. This package's interfaces (msg/, srv/, action/) generated and installed into the venv.
#    Only the interfaces: the Python code is installed editable in step 4. The
#    generated Python modules go to their own folder, put on sys.path by a .pth
#    that sorts after the editable install's, so `import nextchat_ros` finds the
#    source tree and nextchat_ros/__init__.py extends its __path__ to them.
if_hash=$(hash_of CMakeLists.txt package.xml msg/*.msg srv/*.srv action/*.action)
if ! stamp_ok interfaces "$if_hash"; then
  say "generating ROS interfaces (msg/, srv/, action/) with rosidl into the venv"
  build="$VENV/.nextchat-build/interfaces"
  rm -rf "$build"; mkdir -p "$build"
  (
    export AMENT_PREFIX_PATH="$VENV" PATH="$VENV/bin:$PATH"
    cmake -S "$ROOT" -B "$build" -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_INSTALL_PREFIX="$VENV" -DCMAKE_PREFIX_PATH="$VENV" \
      -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF \
      -DNEXTCHAT_INSTALL_PYTHON_CODE=OFF -DPYTHON_INSTALL_DIR=lib/nextchat_ros_interfaces \
      > "$build/configure.log" 2>&1 || { cat "$build/configure.log"; exit 1; }
    cmake --build "$build" -j "$(nproc)" > "$build/build.log" 2>&1 || { tail -50 "$build/build.log"; exit 1; }
    cmake --install "$build" > "$build/install.log" 2>&1 || { cat "$build/install.log"; exit 1; }
  )
  # The generated egg-info would make pip take these files for an older install of
  # nextchat_ros and delete them when step 4 installs the real one.
  rm -rf "$VENV"/lib/nextchat_ros_interfaces/nextchat_ros-*.egg-info
  site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$VENV/lib/nextchat_ros_interfaces" > "$site/nextchat_ros_interfaces.pth"
  stamp_set interfaces "$if_hash"
fi

# 4. nextchat_ros itself, editable ("compat": a plain path entry, see step 3).
pkg_hash=$(hash_of setup.py)
if ! stamp_ok package "$pkg_hash"; then
  say "installing nextchat_ros (editable) and the \`nextchat\` command"
  quiet_pip install -q --disable-pip-version-check --no-deps --no-build-isolation \
    -e "$ROOT" --config-settings editable_mode=compat
  stamp_set package "$pkg_hash"
fi

# training/ and export/ hold the nextchat_training and nextchat_export packages
# (see setup.py); make them importable.
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
printf '%s\n%s\n' "$ROOT/training" "$ROOT/export" > "$site/nextchat_ros_training.pth"

# 5. The real `ros2` tooling (launch, ros2cli, vision_msgs), where its sources are here.
tools="${NEXTCHAT_ROS2_TOOLS:-$ROOT/../shared/ros2}"
if [ -x "$tools/install.sh" ] || [ -f "$tools/install.sh" ]; then
  bash "$tools/install.sh" "$VENV" 2>&1 | sed -e '/is ignored: it is neither/d' -e 's/^/[bootstrap] /'
fi

"$VENV/bin/python" -c "import nextchat_ros.msg, nextchat_ros.srv, nextchat_ros.action, nextchat_training, nextchat_export" \
  || { say "ERROR: nextchat_ros messages do not import from $VENV"; exit 1; }
say "environment ready: $VENV"
