#!/usr/bin/env bash
# Install the Claude Code CLI from npm into a private directory and print the
# absolute path of its native `claude` binary on the last stdout line.
#
#   usage: .ci/install_claude_code.sh [DIR]        (default: $PWD/.cache/claude-code)
#   env:   CLAUDE_CODE_VERSION  npm version/tag to install (default: latest)
#          CLAUDE_CODE_FORCE=1  reinstall even if a working binary is present
#
# Idempotent: when DIR already holds a working binary of the requested version
# (for "latest": any working binary) nothing is downloaded.
# Needs only node + npm. All npm chatter goes to stderr; stdout is the path.
#
# The npm package ships its native binary in an optional per-platform package
# (@anthropic-ai/claude-code-<platform>/claude). The wrapper's postinstall only
# hard-links it over bin/claude.exe, so scripts are skipped and the platform
# binary is used directly. Note: without an explicit version, npm on Node < 22
# would pick an older release (newer ones declare engines.node >= 22); asking
# for the "latest" tag explicitly installs the newest one (the binary does not
# use the local node).
set -euo pipefail

DIR="${1:-$PWD/.cache/claude-code}"
VERSION="${CLAUDE_CODE_VERSION:-latest}"
PKG="@anthropic-ai/claude-code"

log() { printf '%s\n' "install_claude_code: $*" >&2; }
die() { log "error: $*"; exit 1; }

command -v node >/dev/null 2>&1 || die "node not found on PATH"
command -v npm  >/dev/null 2>&1 || die "npm not found on PATH"

mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd -P)"

# Platform key, computed the way the package's own install.cjs does.
PLATFORM="$(node -e '
const os = require("os");
let p = process.platform, a = os.arch();
if (p === "linux") {
  const r = process.report && process.report.getReport ? process.report.getReport() : null;
  const musl = r != null && r.header && r.header.glibcVersionRuntime === undefined;
  console.log("linux-" + a + (musl ? "-musl" : ""));
} else if (p === "darwin" && a === "x64") {
  let t = "";
  try { t = require("child_process").execSync("sysctl -n sysctl.proc_translated", {stdio: ["ignore", "pipe", "ignore"]}).toString().trim(); } catch (e) {}
  console.log("darwin-" + (t === "1" ? "arm64" : "x64"));
} else {
  console.log(p + "-" + a);
}')"
case "$PLATFORM" in win32-*) BIN_NAME="claude.exe" ;; *) BIN_NAME="claude" ;; esac

NM="$DIR/node_modules/@anthropic-ai"
find_binary() {
  local c
  for c in "$NM/claude-code-$PLATFORM/$BIN_NAME" "$NM/claude-code/bin/claude.exe"; do
    # bin/claude.exe is a small placeholder stub unless the postinstall ran.
    if [ -f "$c" ] && [ -x "$c" ] && [ "$(wc -c <"$c")" -gt 1000000 ]; then
      printf '%s\n' "$c"; return 0
    fi
  done
  return 1
}

installed_version() {  # version string from `claude --version`, e.g. 2.1.332
  "$1" --version 2>/dev/null | awk 'NR==1{print $1}'
}

is_exact_version() { [[ "$VERSION" =~ ^[0-9]+\.[0-9]+\.[0-9]+([-+].*)?$ ]]; }

if [ "${CLAUDE_CODE_FORCE:-0}" != "1" ] && BIN="$(find_binary)"; then
  have="$(installed_version "$BIN" || true)"
  if [ -n "$have" ] && { ! is_exact_version || [ "$have" = "$VERSION" ]; }; then
    log "already installed: $have ($BIN)"
    printf '%s\n' "$BIN"
    exit 0
  fi
fi

# A private package.json keeps npm from walking up to an enclosing project.
[ -f "$DIR/package.json" ] || printf '{ "name": "claude-code-cache", "private": true }\n' >"$DIR/package.json"

log "npm install $PKG@$VERSION into $DIR ($PLATFORM)"
start=$(date +%s)
npm install --prefix "$DIR" --no-audit --no-fund --no-update-notifier \
  --ignore-scripts --include=optional --loglevel=error \
  "$PKG@$VERSION" 1>&2 || die "npm install failed"
log "npm install took $(( $(date +%s) - start )) s"

BIN="$(find_binary)" || die "native binary not found; expected $NM/claude-code-$PLATFORM/$BIN_NAME (optional dependency skipped? unsupported platform?)"
have="$(installed_version "$BIN")" || die "$BIN does not run"
[ -n "$have" ] || die "$BIN --version printed nothing"
log "installed: $have"
printf '%s\n' "$BIN"
