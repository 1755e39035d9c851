#!/usr/bin/env bash
# The question-agnostic ten-fact test (benchmarks/head_split.py) on a held-out set of documents,
# fixed before any setting was run on it (session 20). The rule that chose them: of each L-Eval
# set in ../shared/data, the next distinct contexts after those earlier sessions used (financial_qa
# rows 0 and 8, legal_contract_qa row 0, natural_question row 0), by row index, unread:
#   financial_qa rows 16, 24, 34; legal_contract_qa rows 8, 16, 22; natural_question rows 5, 10.
# Each: its first 4,000 tokens, the ten facts hidden at spread depths, ratios 0.1 and 0.2, each
# setting counted against the facts a query-aware read (evidencekv, `kvcli ask`'s default) finds.
#   bash benchmarks/heldout_agnostic.sh [SETTINGS] [OUT_DIR]
# SETTINGS: head_split.py's --settings (default: the agnostic default, and the same without
# surprisal). One JSON per document in OUT_DIR (default: heldout/), then the table (heldout_table.py).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
data="${KVCLI_DATA:-$here/../../shared/data}/leval"
S=dynamickv:adaptive:0.2:kernel_size=1:rescore=2
settings=${1:-"$S:surprisal=0.35,$S"}
out=${2:-heldout}
mkdir -p "$out"
python=${PYTHON:-python}
for doc in financial_qa:16 financial_qa:24 financial_qa:34 legal_contract_qa:8 legal_contract_qa:16 \
           legal_contract_qa:22 natural_question:5 natural_question:10; do
  set_name=${doc%%:*}
  row=${doc##*:}
  echo "== $doc"
  "$python" "$here/head_split.py" --haystack "$data/$set_name.rows.jsonl:$row" --length 4000 --ratios 0.1,0.2 \
    --settings "$settings" --query-aware evidencekv --json "$out/$set_name-$row.json"
done
"$python" "$here/heldout_table.py" "$out"/*.json
