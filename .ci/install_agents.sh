#!/usr/bin/env bash
# Install the other terminal agents `plano cli-agent` launches, each from npm into its own private
# directory, and print the absolute path of each one's program, one a line (gemini, qwen, opencode).
#
#   usage: .ci/install_agents.sh [CACHE]     (default: $PWD/.cache; agents go to CACHE/<name>)
#   env:   GEMINI_CLI_VERSION  @google/gemini-cli version (default: 0.61.0, the version FACTS.md §7 observed)
#          QWEN_CODE_VERSION   @qwen-code/qwen-code version (default: 0.15.10, likewise)
#          OPENCODE_VERSION    opencode-ai version (default: 1.18.33, likewise)
#          AGENTS_FORCE=1      reinstall even if the wanted version is present
#
# npm scripts are skipped for all three: Gemini CLI and Qwen Code are plain node programs (bin
# scripts) that need none, and opencode-ai's postinstall only looks for (or downloads) its native
# binary, which arrives anyway in the optional per-platform package opencode-<os>-<arch>, so that
# binary is run directly. opencode's file search needs `rg` on PATH (Debian's ripgrep): without it,
# opencode downloads ripgrep from GitHub at run time. Needs node >= 20 and npm; npm's chatter goes to
# stderr, stdout is the paths.
set -euo pipefail

CACHE="${1:-$PWD/.cache}"

log() { printf '%s\n' "install_agents: $*" >&2; }
die() { log "error: $*"; exit 1; }

command -v node >/dev/null 2>&1 || die "node not found on PATH"
command -v npm  >/dev/null 2>&1 || die "npm not found on PATH"

mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd -P)"

# install NAME PACKAGE VERSION RELATIVE_PROGRAM: npm-installs PACKAGE@VERSION into CACHE/NAME unless
# the program there already reports VERSION, then prints the program's path.
install() {
  local name="$1" pkg="$2" version="$3" program="$CACHE/$1/$4" have
  if [ "${AGENTS_FORCE:-0}" != "1" ] && [ -x "$program" ]; then
    have="$("$program" --version 2>/dev/null | awk 'NR==1{print $NF}' || true)"
    if [ "$have" = "$version" ]; then
      log "$name already installed: $have"
      printf '%s\n' "$program"
      return 0
    fi
  fi
  mkdir -p "$CACHE/$name"
  [ -f "$CACHE/$name/package.json" ] || printf '{ "name": "%s-cache", "private": true }\n' "$name" >"$CACHE/$name/package.json"
  log "npm install $pkg@$version into $CACHE/$name"
  local start; start=$(date +%s)
  npm install --prefix "$CACHE/$name" --no-audit --no-fund --no-update-notifier \
    --ignore-scripts --include=optional --loglevel=error "$pkg@$version" 1>&2 || die "npm install $pkg failed"
  log "npm install $pkg took $(( $(date +%s) - start )) s"
  [ -x "$program" ] || die "$program not found after installing $pkg (optional dependency skipped? unsupported platform?)"
  have="$("$program" --version 2>/dev/null | awk 'NR==1{print $NF}')" || die "$program does not run"
  [ "$have" = "$version" ] || die "$program reports version '$have', wanted $version"
  log "$name installed: $have"
  printf '%s\n' "$program"
}

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64)  OPENCODE_PLATFORM=linux-x64 ;;
  Linux-aarch64) OPENCODE_PLATFORM=linux-arm64 ;;
  Darwin-arm64)  OPENCODE_PLATFORM=darwin-arm64 ;;
  Darwin-x86_64) OPENCODE_PLATFORM=darwin-x64 ;;
  *) die "no opencode binary for $(uname -s)-$(uname -m)" ;;
esac

install gemini-cli @google/gemini-cli "${GEMINI_CLI_VERSION:-0.61.0}" node_modules/.bin/gemini
install qwen-code @qwen-code/qwen-code "${QWEN_CODE_VERSION:-0.15.10}" node_modules/.bin/qwen
install opencode opencode-ai "${OPENCODE_VERSION:-1.18.33}" "node_modules/opencode-$OPENCODE_PLATFORM/bin/opencode"
