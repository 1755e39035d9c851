"""What an eval runs: each method at each budget or ratio, in each way of reading the prompt (`MODES`).

`query` puts the question in the observation window (one capture serves every setting), `reuse`
compresses the document with a generic instruction in the window and feeds the question after
it (`ask --reuse --scorer instruction`), `reuse-repeat` compresses the same prefix ranked by the
repeat scorer instead (`ask --reuse` and `compress` by default), and `chunked` reads the prompt in chunks,
compressing after each, as `ask --chunk-size` does. The scorer is a mode, not an option, so that
`--modes reuse,reuse-repeat` compares both scorers side by side in one run (one log, one table).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import BudgetError, InputError
from ..methods import Method
from ..reading.prefix import check_scorer

MODES = ("query", "reuse", "reuse-repeat", "chunked", "skim")
# The full cache a mode's scores are compared with: chunking only applies when compressing,
# so chunked reads share the query-aware prompt's full cache, and both scorers of the reused
# prefix share its full cache.
REFERENCE_MODE = {"query": "query", "reuse": "reuse", "reuse-repeat": "reuse", "chunked": "query", "skim": "query"}


@dataclass(frozen=True)
class Setting:
    """One method at one budget or ratio, read in one mode; `full` has no budget or ratio."""

    method: str
    budget: int | None = None
    ratio: float | None = None
    mode: str = "query"
    chunk_size: int | None = None  # chunked mode only

    @property
    def key(self) -> tuple:
        return (self.method, self.budget, self.ratio, self.mode, self.chunk_size)

    @classmethod
    def of(cls, record: dict) -> Setting:
        """The setting a sample or summary entry belongs to (logs from before modes are `query`)."""
        return cls(record["method"], record["budget"], record["ratio"], record.get("mode", "query"), record.get("chunk_size"))

    @property
    def row_label(self) -> str:
        """The method, with how it read the prompt unless query-aware."""
        if self.mode == "chunked":
            return f"{self.method} (chunked {self.chunk_size})"
        return self.method if self.mode == "query" else f"{self.method} ({self.mode})"

    @property
    def label(self) -> str:
        if self.budget is not None:
            return str(self.budget)
        if self.ratio is not None:
            return f"{self.ratio:g}"
        return "full"


def settings_for(
    methods: Sequence[Method],
    budgets: Sequence[int] | None,
    ratios: Sequence[float] | None,
    modes: Sequence[str] = ("query",),
    chunk_size: int | None = None,
) -> list[Setting]:
    """Every method at every budget (or ratio) in every mode; `full` once per prompt it is read with."""
    if not modes:
        raise InputError(f"--modes is empty; give {', '.join(MODES)}")
    for mode in modes:
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if len(set(modes)) != len(modes):
        raise InputError(f"--modes lists a mode twice: {', '.join(modes)}")
    if budgets is not None and ratios is not None:
        raise BudgetError("give --budgets or --ratios, not both")
    if not methods:
        raise InputError("no methods to evaluate; give --methods")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise InputError(f"--methods lists a method twice: {', '.join(names)}")
    if budgets is None and ratios is None:
        raise BudgetError("give --budgets or --ratios")
    levels = list(budgets if budgets is not None else ratios)
    if not levels:
        raise BudgetError("--budgets/--ratios is empty")
    for method in methods:
        if not method.compresses:
            continue
        for budget in budgets or []:
            if budget <= method.window_size:
                raise BudgetError(f"--budgets {budget} is not larger than {method.name}'s observation window ({method.window_size} tokens); use budgets above {method.window_size} or a smaller --window")
        for ratio in ratios or []:
            if not 0 < ratio <= 1:
                raise BudgetError(f"--ratios must lie in (0, 1], got {ratio}")
        if "reuse-repeat" in modes:
            check_scorer("repeat", method)
        if "chunked" in modes and (chunk_size is None or chunk_size < 2 * method.window_size):
            raise InputError(f"--chunk-size must be at least twice {method.name}'s window ({2 * method.window_size} tokens) for chunked mode, got {chunk_size}")
    out: list[Setting] = []
    for mode in modes:
        for method in methods:
            if not method.compresses:
                full = Setting(method.name, mode=REFERENCE_MODE[mode])
                if full not in out:
                    out.append(full)
                continue
            chunk = chunk_size if mode == "chunked" else None
            for level in levels:
                if budgets is not None:
                    out.append(Setting(method.name, budget=level, mode=mode, chunk_size=chunk))
                else:
                    out.append(Setting(method.name, ratio=level, mode=mode, chunk_size=chunk))
    return out
