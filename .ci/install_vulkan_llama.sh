#!/usr/bin/env bash
# A GPU-capable llama-cpp-python for a machine with no GPU: the venv's version built again with
# llama.cpp's Vulkan backend into a private directory (the venv keeps its CPU build), and Mesa's
# lavapipe, a Vulkan driver that computes on the CPU. The router's GPU tests import it from there
# with PYTHONPATH. Prints the directory on the last stdout line.
#
#   usage: .ci/install_vulkan_llama.sh [DIR]
#          DIR defaults to ~/.cache/plano/llama-vulkan-VERSION (XDG_CACHE_HOME respected), where
#          test_plano.py looks: outside the work tree, so a fresh clone (CI's) reuses the build.
#   env:   LLAMA_VULKAN_FORCE=1   rebuild even if DIR holds a build of the venv's version
#          LLAMA_VULKAN_PYTHON  the venv's python (default: .venv/bin/python)
#
# The build takes 8.5-12 min on 2 cores (800-1350 CPU seconds: llama.cpp and its Vulkan shaders).
# Run from the repository root with the project's venv at .venv; needs root or sudo for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${LLAMA_VULKAN_PYTHON:-$PWD/.venv/bin/python}"

log() { printf '%s\n' "install_vulkan_llama: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ -x "$PY" ] || die "no python at $PY"
VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')" \
  || die "the venv has no llama-cpp-python to match"
DIR="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/plano/llama-vulkan-$VERSION}"
sudo=$([ "$(id -u)" = 0 ] || echo sudo)

# lavapipe (mesa-vulkan-drivers), the Vulkan loader and headers, and glslc for the shaders.
if ! dpkg -s mesa-vulkan-drivers libvulkan-dev glslc spirv-headers >/dev/null 2>&1; then
  log "apt-get install mesa-vulkan-drivers libvulkan-dev glslc spirv-headers"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    mesa-vulkan-drivers libvulkan-dev glslc spirv-headers >/dev/null
fi

# ggml-vulkan enables the validation layer's settings (VK_EXT_layer_settings): Vulkan headers
# 1.3.272 or later. Debian 12 ships 1.3.239, so there the headers come from Debian 13's
# libvulkan-dev, unpacked for this build only: the system's loader and driver stay as they are
# (the headers are only compiled against; the loader is asked for newer functions at run time).
lavapipe_visible() {
  GGML_VK_VISIBLE_DEVICES=0 PYTHONPATH="$DIR" "$PY" -c \
    'import llama_cpp.llama_cpp as c, sys; sys.exit(0 if c.llama_supports_gpu_offload() else 1)' 2>/dev/null
}
if [ "${LLAMA_VULKAN_FORCE:-0}" != "1" ] && [ -d "$DIR/llama_cpp_python-$VERSION.dist-info" ] \
    && [ -n "$(ls "$DIR"/llama_cpp/lib/libggml-vulkan.so* 2>/dev/null)" ] && lavapipe_visible; then
  log "already built: llama-cpp-python $VERSION with Vulkan ($DIR)"
  printf '%s\n' "$DIR"
  exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
INCLUDE=""
if ! grep -q "LayerSettingEXT" /usr/include/vulkan/vulkan_structs.hpp 2>/dev/null; then
  # A private apt state holding only Debian 13's index, from the mirror this machine already uses.
  uri="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
  [ -n "$uri" ] || uri="$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)"
  [ -n "$uri" ] || die "cannot tell which Debian mirror this machine uses"
  mkdir -p "$WORK/apt/lists/partial" "$WORK/apt/parts"
  printf 'Types: deb\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: %s\n' \
    "$uri" /usr/share/keyrings/debian-archive-keyring.gpg >"$WORK/apt/parts/trixie.sources"
  apt_private=(-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$WORK/apt/parts"
               -o Dir::State::Lists="$WORK/apt/lists" -o APT::Sandbox::User=root)
  log "Vulkan headers $(awk '/define VK_HEADER_VERSION /{print $3}' /usr/include/vulkan/vulkan_core.h) are too old:" \
      "using Debian 13's libvulkan-dev headers"
  $sudo apt-get "${apt_private[@]}" update -qq
  (cd "$WORK" && $sudo apt-get "${apt_private[@]}" download -qq libvulkan-dev/trixie)
  dpkg-deb -x "$WORK"/libvulkan-dev_*.deb "$WORK/headers"
  INCLUDE="-DVulkan_INCLUDE_DIR=$WORK/headers/usr/include"
fi

# --no-cache-dir: pip's wheel cache would hand back the venv's CPU build of the same version.
log "building llama-cpp-python $VERSION with GGML_VULKAN into $DIR (8.5-12 min on 2 cores)"
start=$(date +%s)
CMAKE_ARGS="-DGGML_VULKAN=ON -DLLAVA_BUILD=OFF $INCLUDE" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  "$PY" -m pip install --quiet --no-deps --no-cache-dir --no-binary llama-cpp-python \
  --target "$WORK/target" "llama-cpp-python==$VERSION" 1>&2 || die "the build failed"
log "built in $(( $(date +%s) - start )) s"
rm -rf "$DIR"
mkdir -p "$(dirname "$DIR")"
mv "$WORK/target" "$DIR"

lavapipe_visible || die "the build sees no Vulkan device (is mesa-vulkan-drivers installed?)"
log "llama-cpp-python $VERSION with Vulkan sees lavapipe"
printf '%s\n' "$DIR"
