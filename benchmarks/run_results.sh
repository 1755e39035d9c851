#!/usr/bin/env bash
# Reproduces the accuracy tables and the many-questions measurements of docs/results.md
# (a few hours of CPU; the eval runs resume: rerun to continue).
#   bash benchmarks/run_results.sh [OUTDIR]
set -euo pipefail
out=${1:-results}
mkdir -p "$out"
data=${KVCLI_DATA:-../shared/data/longbench_multi_news.jsonl}
needle="The key to the archive room is kept under the blue ceramic owl on the librarian's desk."
question="Where is the key to the archive room kept?"
niah() {  # model lengths
  kvcli eval --niah --haystack samples/haystack.txt --needle "$needle" --question "$question" --answer owl \
    --lengths "$2" --depths 0.1,0.5,0.9 --methods all --budgets 32,64,128,256 --max-new-tokens 20 \
    -m "$1" -o "$out/niah-$1.json"
}
news() {  # model limit
  kvcli eval --data "$data" --metric rouge_l --limit "$2" --methods all --budgets 32,64,128,256 \
    --max-new-tokens 64 -m "$1" -o "$out/multi_news-$1.json"
}
niah smollm2-135m 2000,7000
niah qwen2.5-coder-0.5b 2000,7000
news smollm2-135m 4
news qwen2.5-coder-0.5b 2

# One document, many questions (issue 5): ten facts in a ~3,200-token prompt, read three ways,
# then --reuse at higher ratios, ten questions' wall time, and memory at the model's full context.
m=qwen2.5-coder-0.5b
python benchmarks/reuse_check.py data -m $m --length 3000 -o "$out/questions.jsonl"
kvcli eval --data "$out/questions.jsonl" --metric contains --methods full,dynamickv,evidencekv --ratios 0.1 \
  --modes query,reuse,chunked --chunk-size 512 --max-new-tokens 24 -m $m -o "$out/modes-$m.json"
kvcli eval --data "$out/questions.jsonl" --metric contains --methods full,snapkv,h2o,dynamickv,evidencekv \
  --ratios 0.2,0.4 --modes reuse --max-new-tokens 24 -m $m -o "$out/reuse-ratios-$m.json"
python benchmarks/reuse_check.py time -m $m --length 3000 --ratio 0.1 --json "$out/time-$m.json"
python benchmarks/reuse_check.py memory -m $m --length 32000 --chunk-size 1024 --json "$out/memory-$m.json"

# Many questions at query-aware accuracy (issue 11): the repeat scorer against the instruction
# window, and ten questions about a ~7,000-token document every way kvcli answers them.
kvcli eval --data "$out/questions.jsonl" --metric contains --methods full,snapkv,dynamickv,evidencekv \
  --ratios 0.1,0.3 --modes reuse,reuse-repeat --max-new-tokens 24 -m $m -o "$out/reuse-repeat-$m.json"
python benchmarks/reuse_check.py time -m $m --length 7000 --ratio 0.1 --method evidencekv \
  --ways separate,once,chat,read,read-bf16,compress:instruction,compress:repeat --json "$out/questions10-$m.json"

# Documents longer than the model's context (issue 16): time and memory against length, and a
# fact at three depths of documents 4x --max-context, re-indexed against the middle cut.
python benchmarks/past_window.py lengths -m smollm2-135m --lengths 8000,16000,32000,64000,128000 --json "$out/past-lengths-smollm2-135m.json"
python benchmarks/past_window.py needle -m $m --length 16000 --max-context 4096 --json "$out/past-needle-$m.json"
