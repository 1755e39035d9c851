# Decode tokens/s of snapkv at ratio 0.05 with each head split, alternating rounds (docs/results.md, issue 26).
# Run from the repository root, alone on the machine: bash benchmarks/head_split_decode.sh
# SPLITS (default "equal adaptive global") and ROUNDS (default 2) narrow it; each line also names the
# packed layers' decode attention (KVCLI_ATTENTION_KERNEL: unset = kvcli's kernel where it runs, sdpa = an SDPA call per KV head).
for round in $(seq "${ROUNDS:-2}"); do for split in ${SPLITS:-equal adaptive global}; do
  .venv/bin/kvcli ask samples/python_exceptions.txt "Explain in detail, with examples, what the document says about the with statement." --method snapkv --ratio 0.05 --param head_split=$split --max-new-tokens 64 --threads 1 --json 2>/dev/null | .venv/bin/python -c "import json,sys; s=json.load(sys.stdin)['stats']; h=s['extra'].get('heads',{}); print('$round', '$split', '${KVCLI_ATTENTION_KERNEL:-kernel}', round(s['decode_tokens_per_s'],2), s['decode_tokens'], s['kv_bytes_kept'], h.get('min'), h.get('max'))"
done; done
