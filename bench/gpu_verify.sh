#!/usr/bin/env bash
# The GPU verification run for the dense runtime (on the device machine, after stage_model.sh join):
#   bench/gpu_verify.sh tests|default|7b-b1|7b-b8   (results land in $OUT, one JSON/log per step)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
STAGE=${STAGE:-/tmp/minigen-stage}
export MINIGEN_DEFAULT_MODEL=${MINIGEN_DEFAULT_MODEL:-$STAGE/SmolLM2-135M-Instruct.Q4_1.gguf}
case "${1:-}" in
  tests)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
    python3 -m minigen.chat --prompt "What is the capital of France?" --temperature 0 --stats \
      --device cuda 2>&1 | tee "$OUT/chat_cuda.log" ;;
  default)
    for b in 1 8; do
      python3 bench/decode.py --model default --batch $b --context 8000 --steps 128 --dtype bfloat16 \
        | tee -a "$OUT/decode_smollm2.jsonl"
    done ;;
  7b-b1)
    python3 bench/decode.py --shape llama2-7b --batch 1 --context 8192 --steps 64 | tee "$OUT/decode_llama2-7b_b1.jsonl" ;;
  7b-b8)
    python3 bench/decode.py --shape llama2-7b --batch 8 --context 8192 --steps 32 \
      --transformers dynamic,static | tee "$OUT/decode_llama2-7b_b8.jsonl" ;;
  *) echo "usage: $0 tests|default|7b-b1|7b-b8" >&2; exit 2 ;;
esac
