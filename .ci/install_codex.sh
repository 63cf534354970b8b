#!/usr/bin/env bash
# Install the OpenAI Codex CLI from npm into a private directory and print the absolute path of
# its native `codex` binary on the last stdout line.
#
#   usage: .ci/install_codex.sh [DIR]        (default: $PWD/.cache/codex)
#   env:   CODEX_VERSION  npm version to install (default: 0.171.0, the version FACTS.md §6 observed)
#          CODEX_FORCE=1  reinstall even if a working binary is present
#
# The npm package ships its native binary in an optional per-platform package
# (@openai/codex-linux-x64/vendor/<target triple>/bin/codex); bin/codex.js only finds and runs it,
# so scripts are skipped and the binary is called directly. Needs only node + npm; npm's chatter
# goes to stderr, stdout is the path.
set -euo pipefail

DIR="${1:-$PWD/.cache/codex}"
VERSION="${CODEX_VERSION:-0.171.0}"
PKG="@openai/codex"

log() { printf '%s\n' "install_codex: $*" >&2; }
die() { log "error: $*"; exit 1; }

command -v node >/dev/null 2>&1 || die "node not found on PATH"
command -v npm  >/dev/null 2>&1 || die "npm not found on PATH"

mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd -P)"

find_binary() {
  local c
  for c in "$DIR"/node_modules/@openai/codex-*/vendor/*/bin/codex "$DIR"/node_modules/@openai/codex/vendor/*/codex/codex; do
    if [ -f "$c" ] && [ -x "$c" ]; then
      printf '%s\n' "$c"; return 0
    fi
  done
  return 1
}

installed_version() {  # "codex-cli 0.171.0" → 0.171.0
  "$1" --version 2>/dev/null | awk 'NR==1{print $NF}'
}

if [ "${CODEX_FORCE:-0}" != "1" ] && BIN="$(find_binary)"; then
  have="$(installed_version "$BIN" || true)"
  if [ "$have" = "$VERSION" ]; then
    log "already installed: $have ($BIN)"
    printf '%s\n' "$BIN"
    exit 0
  fi
fi

[ -f "$DIR/package.json" ] || printf '{ "name": "codex-cache", "private": true }\n' >"$DIR/package.json"

log "npm install $PKG@$VERSION into $DIR"
start=$(date +%s)
npm install --prefix "$DIR" --no-audit --no-fund --no-update-notifier \
  --ignore-scripts --include=optional --loglevel=error \
  "$PKG@$VERSION" 1>&2 || die "npm install failed"
log "npm install took $(( $(date +%s) - start )) s"

BIN="$(find_binary)" || die "native binary not found under $DIR/node_modules/@openai (optional dependency skipped? unsupported platform?)"
have="$(installed_version "$BIN")" || die "$BIN does not run"
[ -n "$have" ] || die "$BIN --version printed nothing"
log "installed: $have"
printf '%s\n' "$BIN"
