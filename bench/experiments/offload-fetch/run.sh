#!/usr/bin/env bash
# offload and int4, copy engine vs gather_kv kernel, Llama-2-7B shape, batch 1
# (GPU machine, from the repository root: bash bench/experiments/offload-fetch/run.sh
#  -> offload_int4_copy_vs_kernel_b1.txt)
for ctx in 2048 8192 32000; do
  for pol in offload int4; do
    for f in copy kernel; do
      python3 bench/decode.py --shape llama2-7b --policy $pol --fetch $f --batch 1 --context $ctx --steps 16 --transformers none 2>&1 | grep -v -i warn
    done
  done
done
