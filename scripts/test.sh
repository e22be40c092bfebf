#!/usr/bin/env bash
# The test command: every tier (unit, flow, integration with real servers, fault injection).
# Quick loop while developing: .venv/bin/pytest -m "not slow and not integration"
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/pytest "$@"
