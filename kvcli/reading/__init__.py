"""Ways to read documents into caches, shared by every command and by `kvcli eval`.

- `reader.py`: `Reader`, a loaded model that reads (prompt layout, budgets, the retrieval-head
  profile, end-of-sequence ids), `Options`, and `Reading` (a cache ready for one question).
- `query.py`: query-aware reading, the question in the observation window; one pass, or in
  chunks (`--chunk-size`) with the question probing every chunk.
- `once.py`: read once, compress per question: the full prefix prefilled once, each question
  fed after it and compressed exactly as a one-pass query-aware read would be (`ask -q ... -q`).
- `prefix.py`: a question-agnostic document prefix, compressed once (`--reuse`, `compress`)
  or loaded from a `.kvc` file, that each question follows.
- `sections.py`: summaries past the context by sections (map-reduce): each section that fits
  the context summarized on its own, then the summaries (`summarize --past sections`).
- `policy.py`: the one decision of which of these a command uses (`choose`), and the one
  interface every mode answers (`Mode`: prepare, check, read), for ask, summarize, chat, batch
  and eval alike (`one_capture_serves`); a new mode is its file and one rule there.
- `answer.py`: decoding a `Reading` into text (streamed through a callback), and its `RunStats`.

Each mode reads live (what `ask` runs) and, where one prefill can serve many settings, by
capture and derive (what `eval` runs); the two give the same cache, which the tests check.
Nothing here prints.
"""

from .answer import Answer, add_answer, answer, run_stats
from .once import ReadOnce
from .prefix import Prefix, Reused, saved_prefix
from .query import QueryAware
from .reader import Options, Reader, Reading
from .sections import Sections

__all__ = ["Answer", "add_answer", "Options", "Prefix", "QueryAware", "ReadOnce", "Reader", "Reading", "Reused", "Sections", "answer", "run_stats", "saved_prefix"]
