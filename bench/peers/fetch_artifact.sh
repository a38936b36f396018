#!/usr/bin/env bash
# Fetch the InfiniGen authors' artifact into bench/peers/artifact (git-ignored; never committed).
#   bench/peers/fetch_artifact.sh                  git clone from GitHub (needs the network)
#   bench/peers/fetch_artifact.sh --from GIT_DIR   the same tree from a local clone or mirror
#                                                  (git --git-dir GIT_DIR archive HEAD speedup)
set -euo pipefail
DEST=${DEST:-$(dirname "$0")/artifact}
URL=https://github.com/snu-comparch/InfiniGen
if [ -e "$DEST/speedup/flexgen" ]; then echo "already there: $DEST"; exit 0; fi
mkdir -p "$DEST"
if [ "${1:-}" = "--from" ]; then
  git --git-dir "$2" archive HEAD speedup | tar -x -C "$DEST"
  git --git-dir "$2" rev-parse HEAD > "$DEST/COMMIT"
else
  git clone --depth 1 "$URL" "$DEST.clone"
  (cd "$DEST.clone" && git archive HEAD speedup) | tar -x -C "$DEST"
  git -C "$DEST.clone" rev-parse HEAD > "$DEST/COMMIT"
  rm -rf "$DEST.clone"
fi
echo "artifact at $DEST (commit $(cat "$DEST/COMMIT")), $(du -sh "$DEST" | cut -f1)"
