"""`Layout`: what decides how a document is read, from a model's config and tokenizer alone.

The positions the model reads, the room kept for the answer, the prompt (cut in the middle or
kept whole), the budget a prompt gets, and how a prompt past the positions is read in chunks.
`Reader` (a loaded model) is a `Layout`, and `kvcli plan` builds one without the weights, so a
plan and a real read decide by the same code. Nothing here runs the model.
"""

from __future__ import annotations

from ..attention import ModelAttention
from ..errors import InputError
from ..generate import chunk_bounds
from ..methods import Budget, BudgetPlan, Method, question_plan
from ..prompt import Prompt, build_prompt

DEFAULT_PAST_CHUNK = 2048  # tokens per chunk when reading past the context, unless --chunk-size says


class Layout:
    """A model's config and tokenizer, with the arithmetic of reading a prompt through them.

    Methods taking `options` take a `reading.Options` (the budget, --chunk-size, --max-context,
    --max-new-tokens, --system).
    """

    def __init__(self, config, tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.num_layers = config.num_hidden_layers
        # which layers are sliding-window layers (and so never compressed), predicted from the
        # config; `Reader` replaces it with what a probe through the loaded model found
        self.attention = ModelAttention.from_config(config)
        self._layout = None  # rotary_layout(), made when first needed

    @property
    def max_positions(self) -> int:
        """The positions the model was trained on (32,768 when its config does not say)."""
        return int(getattr(self.config, "max_position_embeddings", 0) or 32768)

    def context_limit(self, options) -> int:
        """The longest prompt plus answer: --max-context if given, else the model's positions."""
        return options.max_context or self.max_positions

    def prompt(self, document: str, question: str, options, instruction: str | None = None, whole: bool = False) -> Prompt:
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

            self._layout = rotary_layout(self.config)
        return self._layout

    def budget_plan(self, method: Method, budget: Budget, prompt_len: int, question: int = 0,
                    repeat: bool = False) -> tuple[BudgetPlan | None, str]:
        """What a prompt of `prompt_len` tokens keeps under `method` and `budget` (None: the full
        cache), and a note when that is not what was asked for (or names a knob that changes nothing). Its last `question` tokens are a
        question, kept whole beside the budget (`methods.question_plan`). `repeat`: the repeat scorer
        ranks the prompt (for the note on idle knobs)."""
        if not method.compresses:
            return None, "method full keeps every token"
        if self.attention.cannot_compress():
            return None, self.attention.cannot_compress()
        # --ratio and --budget are of the global layers: sliding-window layers keep their window (docs/models.md)
        plan, note = question_plan(budget, prompt_len, len(self.attention.compressed_layers), method.window_size, question)
        if plan is not None:  # a knob set that changes nothing is said beside the plan (`Method.idle_knobs`)
            note = "; ".join(part for part in (note, method.idle_knobs(repeat)) if part)
        return plan, note

    def past_chunking(self, options, method: Method, budget: Budget, n: int, reserved: int, chunk_size: int | None = None,
                      question: int = 0):
        """(budget plan, note, chunk size, rotary layout, method) to read `n` tokens past the positions
        the model reads, `reserved` of them kept free after every chunk (the question; the answer's
        room is added here); an InputError for what cannot be read so. The method is `method`, or
        a variant that holds less in one layer (`Method.within`) where its reserve would leave
        chunks of under a quarter of the free positions; the note then says so."""
        limit = self.context_limit(options)
        plan = layout = None
        note = ""
        if method.compresses and self.attention.cannot_compress():
            raise InputError(
                f"the prompt is {n:,} tokens, longer than the {limit:,} positions the model reads (with room for the answer), "
                f"and reading past them needs compression, but {self.attention.cannot_compress().split(':')[0]}: pass --cut-middle")
        free = limit - options.max_new_tokens - reserved  # positions for the kept tokens and one chunk
        if method.compresses:
            layout = self.rotary_layout()  # a RoPE that cannot move is refused first
            # the --min-keep floor leaves at least half the free positions to the chunks
            plan, note = self.budget_plan(method, budget.at_most(max(0, free // 2)), n, question)
        if plan is None:
            raise InputError(
                f"the prompt is {n:,} tokens, longer than the {limit:,} positions the model reads (with room for the answer); "
                f"{'--method full' if not method.compresses else budget.label} keeps every token, so it cannot read past them: "
                "pass a compressing --method at a smaller budget (the default reads it whole in chunks) or --cut-middle"
            )
        most = max(method.most_kept(plan), self.attention.most_in_window)  # every layer is packed below P
        room = free - most
        wanted = min(chunk_size or options.chunk_size or DEFAULT_PAST_CHUNK, free // 4)
        if room < wanted and method.most_kept(plan) > max(free - wanted, self.attention.most_in_window):
            # a method whose reserve leaves small chunks may hold less (dynamickv's max_multiple), unless a window binds
            capped = method.within(plan, max(free - wanted, self.attention.most_in_window))
            if capped is not None:
                method, capped_note = capped
                note = (note + "; " if note else "") + capped_note
                most = max(method.most_kept(plan), self.attention.most_in_window)
                room = free - most
        if room < 2 * method.window_size:
            raise InputError(
                f"at {budget.label} a layer keeps up to {most:,} of the {n:,} tokens, which with the question and the answer "
                f"fills the {limit:,} positions the model reads: lower --ratio or pass a smaller --budget"
            )
        return plan, note, min(chunk_size or options.chunk_size or DEFAULT_PAST_CHUNK, room), layout, method


def prefill_steps(prompt_len: int, chunk_size: int | None, compressed: bool, tail: int = 0, reindexed: bool = False) -> int:
    """How many forward passes `generate.prefill` reads a prompt in, given what it is passed (for a
    plan made without the model: the engine's own split, `generate.chunk_bounds`)."""
    return len(chunk_bounds(prompt_len, chunk_size, compressed, tail, reindexed)) - 1


__all__ = ["DEFAULT_PAST_CHUNK", "Layout", "prefill_steps"]
