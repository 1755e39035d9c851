"""From a loaded model and a document to answers: the steps the commands share.

Three ways to read a document: query-aware (each question gets its own prefill with the
question in the observation window, the paper's setting), reused (the document prefix is
compressed once with a generic instruction in the window, then each question is fed after a
copy of it), and saved (the same prefix, written to a `.kvc` file and read back later).
Nothing here prints; progress and streaming go through callbacks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .cache import KVCache, KVShape
from .errors import InputError
from .generate import Prefill, Sampling, decode, forward, prefill, prepare_model
from .methods import BudgetPlan, Method, plan_budget
from .prompt import REUSE_INSTRUCTION, Prompt, build_prompt, question_suffix, window_text
from .stats import RunStats, peak_memory_bytes


@dataclass
class Options:
    """How a run compresses and generates."""

    ratio: float | None = None
    budget: int | None = None
    chunk_size: int | None = None
    max_context: int | None = None
    max_new_tokens: int = 256
    sampling: Sampling | None = None


@dataclass
class Prefix:
    """A compressed document prefix (the prompt up to the question) that questions follow."""

    state: Prefill  # its cache, length (`prompt_len`) and what making it cost (`seconds`)
    note: str  # why it was not compressed, or ""
    window: str  # what its observation window covered
    source: str  # "reused" or "saved cache"
    charged: bool = False  # whether a question has paid for making it yet

    @classmethod
    def saved(cls, cache: KVCache, length: int, note: str, window: str) -> Prefix:
        state = Prefill(cache=cache, logits=None, prompt_len=length, plan=None, compressor=None, seconds=0.0, compressed=not note)
        return cls(state, note, window, "saved cache")


class Engine:
    """A loaded model with the helpers every command needs."""

    def __init__(self, lm) -> None:
        self.lm = lm  # models.LoadedModel
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.num_layers = self.model.config.num_hidden_layers
        self.shape = KVShape.of(self.model.config, lm.dtype)
        prepare_model(self.model)  # every forward goes through kvcli's per-layer attention

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
        """The longest prompt: --max-context if given (even past the model's limit), else the model's."""
        return options.max_context or self.max_positions

    def prompt(self, text: str, question: str, options: Options, instruction: str | None = None) -> Prompt:
        limit = self.context_limit(options)
        reserve = min(options.max_new_tokens, limit // 4)
        return build_prompt(self.tokenizer, text, question, limit, reserve=reserve, instruction=instruction)

    def prepare(self, method: Method, progress=None) -> Method:
        """Give a method what it needs from this model (the retrieval-head profile, computed once)."""
        if method.needs_profile and getattr(method, "profile", None) is None:
            from .profile import load_or_compute_profile

            method.profile = load_or_compute_profile(self, progress=progress)
        return method

    def plan(self, method: Method, prompt_len: int, options: Options) -> tuple[BudgetPlan | None, str]:
        """The budget for a prompt, and why compression is skipped when it is."""
        if not method.compresses:
            return None, "method full keeps every token"
        plan = plan_budget(prompt_len, self.num_layers, window_size=method.window_size, ratio=options.ratio, budget=options.budget)
        if plan is None:
            return None, f"the {prompt_len}-token prompt already fits the budget"
        return plan, ""

    def read(self, ids: torch.Tensor, method: Method, options: Options, probe_ids=None, layer_callback=None) -> tuple[Prefill, str]:
        """Prefill `ids` `(1, n)` with `method`; returns the state and a note when not compressed."""
        self.prepare(method)
        plan, note = self.plan(method, ids.shape[1], options)
        device = self.lm.device
        state = prefill(
            self.model, ids.to(device), method, plan, layer_callback=layer_callback,
            chunk_size=options.chunk_size, probe_ids=None if probe_ids is None else probe_ids.to(device),
        )
        return state, note

    def extend(self, cache: KVCache, prefix_len: int, suffix_ids: torch.Tensor, seconds: float = 0.0, copy: bool = True) -> Prefill:
        """Feed `suffix_ids` after a compressed prefix (a copy of it unless `copy` is False):
        every layer gets its own causal mask."""
        if copy:
            cache = cache.clone()
        started = time.perf_counter()
        with torch.inference_mode():
            logits = forward(self.model, cache, suffix_ids.to(self.lm.device), prefix_len)
        return Prefill(
            cache=cache, logits=logits, prompt_len=prefix_len + suffix_ids.shape[1], plan=None, compressor=None,
            seconds=seconds + time.perf_counter() - started, compressed=True,
        )

    def stats(self, method: Method, state: Prefill, note: str, window: str, dropped: int = 0) -> RunStats:
        retained = state.cache.retained_per_layer()
        prompt_len = state.prompt_len
        stats = RunStats(
            model=self.lm.name,
            method=method.name,
            method_params=method.params(),
            ratio=sum(retained) / (self.num_layers * prompt_len),
            budget=sum(retained) / self.num_layers,
            prompt_tokens=prompt_len,
            compressed=state.compressed,
            note=note,
            window_text=window,
            retained_per_layer=retained,
            kv_bytes_full=self.shape.bytes_for(prompt_len),
            kv_bytes_kept=state.cache.nbytes(),
            kv_bytes_peak=max(state.cache.peak_nbytes, state.cache.nbytes()),
            peak_memory_bytes=0,
            load_s=self.lm.load_s,
            prefill_s=state.seconds,
            dropped_tokens=dropped,
        )
        if len(state.chunks) > 1:
            stats.extra["chunks"] = [
                {"start": start, "stop": stop, "kept_tokens_over_layers": round(kept, 1)}
                for (start, stop), kept in zip(state.chunks, state.kept_per_chunk())
            ]
        return stats

    def window_text(self, prompt: Prompt, method: Method, state: Prefill) -> str:
        return window_text(self.tokenizer, prompt, method.window_size) if state.compressed else ""

    def generate(self, state: Prefill, options: Options, stats: RunStats, started: float, on_text: Callable[[str], None] | None = None) -> str:
        """Decode from `state`, calling `on_text` with each new piece of text; fill in the timing stats."""
        tokens: list[int] = []
        shown = ""
        first_at = None
        try:
            for token in decode(self.model, state, options.max_new_tokens, self.eos_ids, options.sampling):
                if first_at is None:
                    first_at = time.perf_counter()
                tokens.append(token)
                if on_text is not None:
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                        on_text(text[len(shown):])
                        shown = text
        finally:
            finished = time.perf_counter()
            answer = self.tokenizer.decode(tokens, skip_special_tokens=True)
            stats.ttft_s = (first_at - started) if first_at else None
            stats.decode_tokens = len(tokens)
            stats.decode_s = (finished - first_at) if first_at else 0.0
            stats.peak_memory_bytes = peak_memory_bytes(self.lm.device)
        if on_text is not None and answer[len(shown):]:
            on_text(answer[len(shown):])
        return answer.strip()

    def reuse_prompt(self, text: str, options: Options) -> Prompt:
        """The question-agnostic prompt: its first `prefix_len` ids (the document and a generic
        instruction) are compressed once; questions follow them (`suffix`)."""
        return self.prompt(text, "?", options, instruction=REUSE_INSTRUCTION)

    def compress_prefix(self, text: str, method: Method, options: Options, layer_callback=None) -> tuple[Prompt, Prefix]:
        """Compress a document prefix once, question-agnostic (a generic instruction in the window)."""
        prompt = self.reuse_prompt(text, options)
        ids = prompt.ids[:, : prompt.prefix_len]
        state, note = self.read(ids, method, options, layer_callback=layer_callback)
        window = self.tokenizer.decode(ids[0, -method.window_size :]) if state.compressed else ""
        return prompt, Prefix(state, note, window, "reused")

    def answer_after(self, prefix: Prefix, question: str) -> Prefill:
        """Feed a question after a copy of `prefix`; only the first question pays for making it."""
        made = 0.0 if prefix.charged else prefix.state.seconds
        prefix.charged = True
        return self.extend(prefix.state.cache, prefix.state.prompt_len, self.suffix(question), seconds=made)

    def suffix(self, question: str) -> torch.Tensor:
        if not question.strip():
            raise InputError("the question is empty; pass a question in quotes")
        return question_suffix(self.tokenizer, question, REUSE_INSTRUCTION)
