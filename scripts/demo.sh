#!/usr/bin/env bash
# `make demo`: build a small MoE model here (no download), then inspect, split, verify and merge it.
set -euo pipefail
DIR=${DEMO_DIR:-.demo}
MODEL=$DIR/demo-qwen2moe-f16.gguf
PACK=$DIR/demo-qwen2moe.pack
mkdir -p "$DIR"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "build a tiny qwen2moe test model (routed experts + a shared expert)"
[ -f "$MODEL" ] || python scripts/make_test_model.py --arch qwen2moe --preset tiny --dtype f16 -o "$MODEL"

step "inspect: what is core, what is a leaf"
smoe-gguf inspect "$MODEL"

step "split into a pack: dense core + one shard per leaf + manifest"
smoe-gguf split "$MODEL" -o "$PACK" --force
echo "files in the pack: $(find "$PACK" -type f | wc -l)"

step "verify every part against the manifest"
smoe-gguf verify "$PACK"

step "merge back and compare with the source byte for byte"
smoe-gguf merge "$PACK" -o "$DIR/merged.gguf" --force
cmp "$MODEL" "$DIR/merged.gguf" && echo "merged file is byte-identical to the source"

step "generate from the pack with the experts paged through a 25% X-Slot"
smoe-gguf run "$PACK" -p "The quick brown fox" -n 48 --budget 25% --stats

step "chat with it (the tiny model's weights are random: expect gibberish, in its chat template)"
if [ -t 0 ] && [ -t 1 ]; then
  echo "Your prompt is prefilled while you type; /stats shows the time to first token, Ctrl-D leaves."
  read -r -p "Start the chat now? [Y/n] " answer || answer=n
  case "$answer" in
    [nN]*) echo "skipped; later: smoe-gguf chat $PACK --budget 25%" ;;
    *) smoe-gguf chat "$PACK" --budget 25% -n 64 ;;
  esac
else
  echo "skipped: not a terminal (run \`smoe-gguf chat $PACK --budget 25%\` in one)"
fi

step "next: the same with your own MoE GGUF"
echo "The demo model's weights are random, so its text is noise; a real model's is not."
echo "  source .venv/bin/activate && smoe-gguf split models/YOUR-MODEL.gguf"
echo "  smoe-gguf chat models/YOUR-MODEL.pack      # README: 'Use it with your model'"
