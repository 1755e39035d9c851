"""`Reader`: a loaded model ready to read documents, and what one reading produces."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..cache import KVShape
from ..errors import InputError
from ..generate import Prefill, Sampling, prepare_model
from ..methods import Budget, Compression, Method
from ..prompt import Prompt, build_prompt


DEFAULT_PAST_CHUNK = 2048  # tokens per chunk when reading past the context, unless --chunk-size says


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
    # seconds of this reading's prefill spent before its question was asked (a prefix read once
    # and charged to its first question): the time to the first token counts them
    charged_s: float = 0.0


class Reader:
    """A loaded model (`models.LoadedModel`) with what every way of reading needs."""

    def __init__(self, lm) -> None:
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.num_layers = self.model.config.num_hidden_layers
        self.shape = KVShape.of(self.model.config, lm.dtype)
        self._profile = None
        self._layout = None  # rotary_layout(), made when first needed
        prepare_model(self.model)  # every forward goes through kvcli's per-layer attention

    @property
    def device(self):
        return self.lm.device

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 32768)

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

    def context_limit(self, options: Options) -> int:
        """The longest prompt plus answer: --max-context if given, else the model's positions."""
        return options.max_context or self.max_positions

    def prompt(self, document: str, question: str, options: Options, instruction: str | None = None, whole: bool = False) -> Prompt:
        """The chat prompt, cut in the middle so that it and the answer fit the context (unless `whole`)."""
        limit = (1 << 40) if whole else self.context_limit(options)
        return build_prompt(
            self.tokenizer, document, question, limit, reserve=options.max_new_tokens,
            instruction=instruction, system=options.system,
        )

    def rotary_layout(self):
        """Each layer's rotary frequencies (`rope.rotary_layout`), for reading past the context; refuses a RoPE that cannot move."""
        if self._layout is None:
            from ..rope import rotary_layout

            self._layout = rotary_layout(self.model.config)
        return self._layout

    def plan_past(self, options: Options, method: Method, budget: Budget, n: int, reserved: int, chunk_size: int | None = None):
        """(compression, note, chunk size, rotary layout) to read `n` tokens past the positions the
        model reads, `reserved` of them kept free after every chunk (the question, the answer's
        room is added here); an InputError for what cannot be read so."""
        limit = self.context_limit(options)
        compression = None
        if method.compresses:
            layout = self.rotary_layout()  # a RoPE that cannot move is refused first
            compression, note = self.compression(method, budget, n)
        if compression is None:
            raise InputError(
                f"the prompt is {n:,} tokens, longer than the {limit:,} positions the model reads (with room for the answer); "
                f"{'--method full' if not method.compresses else budget.label} keeps every token, so it cannot read past them: "
                "pass a compressing --method at a smaller budget (the default reads it whole in chunks) or --cut-middle"
            )
        most = method.most_kept(compression.plan)
        room = limit - options.max_new_tokens - reserved - most
        if room < 2 * method.window_size:
            raise InputError(
                f"at {budget.label} a layer keeps up to {most:,} of the {n:,} tokens, which with the question and the answer "
                f"fills the {limit:,} positions the model reads: lower --ratio or pass a smaller --budget"
            )
        return compression, note, min(chunk_size or options.chunk_size or DEFAULT_PAST_CHUNK, room), layout

    def profile(self, progress: Callable[[int, int], None] | None = None):
        """The model's retrieval-head profile, loaded or computed once per reader."""
        if self._profile is None:
            from ..profile import load_or_compute_profile

            self._profile = load_or_compute_profile(self.lm, progress=progress)
        return self._profile

    def compression(self, method: Method, budget: Budget, prompt_len: int) -> tuple[Compression | None, str]:
        """What a prompt of `prompt_len` tokens keeps under `method` and `budget`, and a note
        when that is not what was asked for (None: the full cache)."""
        if not method.compresses:
            return None, "method full keeps every token"
        plan, note = budget.plan(prompt_len, self.num_layers, method.window_size)
        if plan is None:
            return None, note
        return Compression(method, plan, self.profile() if method.needs_profile else None), note
