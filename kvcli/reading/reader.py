"""`Reader`: a loaded model ready to read documents, and what one reading produces."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import InputError
from ..generate import Prefill, Sampling, prepare_model
from ..methods import Budget, Compression, Method
from ..prompt import Prompt
from ..threads import decoding, prefilling
from .layout import DEFAULT_PAST_CHUNK, Layout

__all__ = ["DEFAULT_PAST_CHUNK", "Options", "Reader", "Reading"]


@dataclass
class Options:
    """How a run reads and answers, besides the method: checked once, here."""

    budget: Budget = field(default_factory=Budget)
    chunk_size: int | None = None
    max_context: int | None = None
    max_new_tokens: int = 256
    sampling: Sampling = field(default_factory=Sampling)
    system: str | None = None
    # A document longer than the context: "reindex" reads it whole in chunks, re-indexing the
    # kept keys' positions (compressing methods only); "cut" cuts its middle (--cut-middle).
    fit: str = "reindex"
    # --skim: read the documents through the first layers only and the tokens the question needs
    # through all (`reading.skim.Skimming`); None: every token through every layer.
    skim: object | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.max_context is not None and self.max_context < 1:
            raise InputError(f"--max-context must be a positive number of tokens, got {self.max_context}")

    def check(self, method: Method) -> None:
        """What depends on the method: the window against the budget and the chunk size."""
        if not method.compresses:
            return
        self.budget.check(method.window_size)
        if self.chunk_size is not None and self.chunk_size < 2 * method.window_size:
            raise InputError(f"--chunk-size must be at least twice the window ({2 * method.window_size} tokens), got {self.chunk_size}")


@dataclass
class Reading:
    """A cache ready to answer one question, and how it was made."""

    state: Prefill  # the cache, the next-token logits, the length read and what it cost
    method: Method
    mode: str  # "query", "chunked", "reindexed", "once", "reused" or "saved"
    note: str = ""  # why the cache is not compressed as asked, or ""
    window: str = ""  # what the observation window covered
    prompt: Prompt | None = None  # None when answering after a saved cache
    dropped_tokens: int = 0  # document tokens cut from the middle
    prefix: dict | None = None  # read once: the full prefix's tokens, KV bytes, seconds (first question only), question step seconds
    past: dict | None = None  # read past the context: prompt tokens, the model's positions, chunks, chunk size
    skim: dict | None = None  # a skim: the filter's depth and heads, the tokens that continued, each part's time
    # seconds of this reading's prefill spent before its question was asked (a prefix read once
    # and charged to its first question): the time to the first token counts them
    charged_s: float = 0.0


class Reader(Layout):
    """A loaded model (`models.LoadedModel`) with what every way of reading needs.

    How a prompt is laid out, budgeted and chunked is its `Layout` (config and tokenizer only),
    which `kvcli plan` uses without the weights.
    """

    def __init__(self, lm, threads=None) -> None:
        super().__init__(lm.model.config, lm.tokenizer)
        self.lm = lm
        self.model = lm.model
        self.threads = threads  # a `threads.ThreadPlan` (--threads), or None: torch's threads as they are
        self._profile = None
        # every forward goes through kvcli's per-layer attention; the probe's layout replaces the config's guess
        self.attention = prepare_model(self.model)

    def prefilling(self):
        """The block every prefill runs in: on the thread plan's prefill threads (`threads.prefilling`)."""
        return prefilling(self.threads)

    def decoding(self):
        """The block decoding runs in: on the thread plan's decode threads (`threads.decoding`)."""
        return decoding(self.threads)

    @property
    def device(self):
        return self.lm.device

    @property
    def eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.model.generation_config, self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid >= 0 and tid != unk:
                ids.add(tid)
        return ids

    def plan_past(self, options: Options, method: Method, budget: Budget, n: int, reserved: int, chunk_size: int | None = None,
                  question: int = 0):
        """(compression, note, chunk size, rotary layout) to read `n` tokens past the positions the
        model reads (`Layout.past_chunking`), `reserved` positions kept free after every chunk; the
        last `question` tokens are a question, kept whole (`Compression`). An InputError for what
        cannot be read so."""
        plan, note, chunk, layout, method = self.past_chunking(options, method, budget, n, reserved, chunk_size, question)
        return Compression(method, plan, self.profile() if method.needs_profile else None, question=question), note, chunk, layout

    def profile(self, progress: Callable[[int, int], None] | None = None):
        """The model's retrieval-head profile, loaded or computed once per reader."""
        if self._profile is None:
            from ..profile import load_or_compute_profile

            with self.prefilling():
                self._profile = load_or_compute_profile(self.lm, progress=progress)
        return self._profile

    def compression(self, method: Method, budget: Budget, prompt_len: int, question: int = 0,
                    repeat: bool = False) -> tuple[Compression | None, str]:
        """What a prompt of `prompt_len` tokens keeps under `method` and `budget`, and a note
        when that is not what was asked for (None: the full cache). The prompt's last `question`
        tokens are a question, kept whole beside the budget (`Compression`): the budget is the
        document's, the prompt before the question (`methods.question_plan`). `repeat`: the repeat
        scorer ranks the prompt."""
        plan, note = self.budget_plan(method, budget, prompt_len, question, repeat)
        if plan is None:
            return None, note
        return Compression(method, plan, self.profile() if method.needs_profile else None, question=question), note
