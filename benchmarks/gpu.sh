#!/usr/bin/env bash
# The GPU check: extraction throughput (ResNet-50 and ViT-L/16 at 224 px, batch sizes, reader workers, GPU
# utilisation) and batched fold-fits per minute, in under 8 minutes on one CUDA GPU, into
# benchmarks/results/gpu.{json,md}. Needs only what `pip install -e .` installs; downloads nothing.
# Usage: benchmarks/gpu.sh [options of benchmarks/gpu.py, e.g. --budget-min 7]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "benchmarks/gpu.sh needs a CUDA GPU and torch.cuda.is_available() is False here; run it on a machine with an NVIDIA GPU and a CUDA build of torch." >&2
    exit 1
fi
exec "$PYTHON" benchmarks/gpu.py "$@"
