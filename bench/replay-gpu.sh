#!/usr/bin/env bash
# The GPU speed replay of docs/reasoning.md, as one command for a CUDA machine that has python3 with torch and
# transformers but nothing of this project installed and no network. Run from the repository root with
# .build/smollm2-shape carried (written here by `python -m bench.reasoning shape`); figures go to $OUT (or .).
# `latentmas` is imported from core/ through a link (core/'s own links reach services/ and the other folders).
# 8 questions x 11 methods, one question at a time, to stay inside the device tool's 600 s (later flags win):
# DEVICE=cpu PYTHON=.venv/bin/python bash bench/replay-gpu.sh --questions 1   # the CPU-scale check
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pkg="$(mktemp -d)"
ln -s "$root/core" "$pkg/latentmas"
export PYTHONPATH="$pkg:$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$root"
"${PYTHON:-python3}" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
exec "${PYTHON:-python3}" -m bench.reasoning replay \
    --lengths docs/reasoning-accuracy-smollm2.json --shape .build/smollm2-shape --device "${DEVICE:-cuda}" \
    --methods single,text-seq,text-hier,latent-seq-m0,latent-seq-m8,latent-seq-m16,latent-seq-m40,latent-hier-m0,latent-hier-m8,latent-hier-m16,latent-hier-m40 \
    --questions 8 --json "${OUT:-.}/replay-${DEVICE:-cuda}.json" "$@"
