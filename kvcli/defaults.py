"""The defaults the command line shows in `--help` before anything heavy is imported.

`kvcli --help`, an argument error and `kvcli methods` import neither torch nor transformers
(tests/test_startup.py): the constants their help needs live here, and the modules that use
them import them from here.
"""

DEFAULT_METHOD = "evidencekv"  # measured best on both embedded models (docs/results.md)
DEFAULT_SCORER = "repeat"  # how a question-agnostic cache ranks tokens (reading/prefix.py)
# The method of a question-agnostic cache ranked by the repeat scorer (`compress`, `ask --reuse`)
# when --method is not given: DynamicKV's layer budgets, each layer's budget split over its heads
# by their scores (Ada-KV) with a fifth of an equal share each, the repeat's scores unpooled
# (KVzip ranks entries alone), and a second repeat over a cut of twice the budget ranking what is
# kept (`rescore`), the first repeat's scores weighed by how surprising each token was (`surprisal`).
# Measured against the default method on the ten-fact documents of both embedded models
# (docs/results.md, "No pooling for the repeat's scores", "A second repeat over a cut", "Weighed by surprisal").
AGNOSTIC_METHOD = "dynamickv"
AGNOSTIC_PARAMS = ("head_split=adaptive", "head_floor=0.2", "kernel_size=1", "rescore=2", "surprisal=0.35")
DEFAULT_SOURCES = 3  # passages `--sources` shows when no number follows it (reading/cite.py)
DEFAULT_SKIM_TOKENS = 2048  # document tokens `--skim` sends through every layer (docs/results.md, skim)
