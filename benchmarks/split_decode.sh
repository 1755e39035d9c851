#!/usr/bin/env bash
# Decode rate of one query-aware read with each head split, in turn, three rounds, alone on the machine:
#   bash benchmarks/split_decode.sh [SPLITS] [ROUNDS]     (default: "equal profile" 3)
# Each line: the split, decode tokens/s, the fewest and most tokens one head kept, the KV bytes kept.
# The same document, question and budget (the default: ratio 0.1, min-keep 1024) for every split.
set -euo pipefail
cd "$(dirname "$0")/.."
splits=${1:-"equal profile"}
rounds=${2:-3}
kvcli=${KVCLI:-.venv/bin/kvcli}
for _ in $(seq "$rounds"); do
  for split in $splits; do
    "$kvcli" ask samples/python_exceptions.txt "Explain in detail how exception chaining works and what the raise from statement does." \
      --param "head_split=$split" --max-new-tokens 96 --json 2>/dev/null | python3 -c "
import json, sys
stats = json.load(sys.stdin)['stats']
heads = stats['extra'].get('heads')
print('$split', round(stats['decode_tokens_per_s'], 2), (heads['min'], heads['max']) if heads else 'dense', stats['kv_bytes_kept'])"
  done
done
