"""The defaults the command line shows in `--help` before anything heavy is imported.

`kvcli --help`, an argument error and `kvcli methods` import neither torch nor transformers
(tests/test_startup.py): the constants their help needs live here, and the modules that use
them import them from here.
"""

DEFAULT_METHOD = "evidencekv"  # measured best on both embedded models (docs/results.md)
DEFAULT_SCORER = "repeat"  # how a question-agnostic cache ranks tokens (reading/prefix.py)
DEFAULT_SOURCES = 3  # passages `--sources` shows when no number follows it (reading/cite.py)
DEFAULT_SKIM_TOKENS = 2048  # document tokens `--skim` sends through every layer (docs/results.md, skim)
