#!/usr/bin/env bash
# GPU acceptance of the large-scale path: BigGAN-128 (ch 96) throughput at batch 256 per GPU in bf16, the
# largest batch that fits, fp16, a 100-step training run and a GPU evaluation; one table at the end.
#   scripts/gpu-acceptance.sh OUT_DIR           on a CUDA machine
#   scripts/gpu-acceptance.sh --tiny OUT_DIR    the same steps at a tiny width on any device (CPU check)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_acceptance.py "$@"
