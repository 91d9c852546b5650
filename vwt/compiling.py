"""``torch.compile`` for measured and evaluated models, with what the compiler did made visible.

A model compiles with torch.compile's default mode (inductor, not max-autotune: its kernel search
takes minutes per shape on a CPU and was not measured faster here) and, where the token count varies
per image (an input reducer: intra- and inter-image keep a different number of tokens per image),
``dynamic=True``, so a new token count is not a new compilation. Every compiled call is its own
compiled region (``isolate_recompiles`` where torch has it), so configurations that share code (every
patched tower runs the same block loop) neither count against nor reuse each other's compilations.

:func:`first_calls` runs a compiled callable's first calls and says what they cost and did: seconds
(the compilation, kept out of any timing), graphs compiled by the first call, graph breaks, and
recompilations after it (a recompile per shape shows up there). Nothing falls back silently: a
compilation that fails is an error the caller records, and each time torch hits its recompile limit
(after which it runs that code eagerly; ToMe's merge, resumed after a graph break, recompiles per
block) is counted and said in :attr:`CompileReport.note`.
"""
from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

MODE = "default"


def compiled(fn: Callable, dynamic: bool) -> Callable:
    """``fn`` (a module or function) under torch.compile's default mode; ``dynamic`` True where the
    token count varies per image, else None (torch's default: static shapes first)."""
    options: dict[str, Any] = dict(mode=None if MODE == "default" else MODE, dynamic=True if dynamic else None)
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        options["isolate_recompiles"] = True
    return torch.compile(fn, **options)


def _counters() -> tuple[int, int, dict]:
    """(graphs compiled, graph breaks, break reasons) so far, from torch._dynamo's counters."""
    from torch._dynamo.utils import counters

    reasons = dict(counters["graph_break"])
    return counters["stats"]["unique_graphs"], sum(reasons.values()), reasons


def recompile_limit() -> int:
    """torch's limit of compilations of one code object per region (then it runs eagerly)."""
    import torch._dynamo.config as config

    return int(getattr(config, "recompile_limit", getattr(config, "cache_size_limit", 8)))


@dataclass
class CompileReport:
    """What a compiled callable's first calls cost and did."""

    seconds: float = 0.0
    graphs: int = 0  # graphs the first call compiled (more than one: it broke into pieces)
    graph_breaks: int = 0
    recompiles: int = 0  # graphs compiled after the first call
    reasons: list = field(default_factory=list)  # the graph breaks' reasons, first line of each
    limit_hits: int = 0  # times torch hit its recompile limit: that code then runs eagerly

    @property
    def note(self) -> str:
        """One line on what stops it from compiling whole (empty: one graph, no recompilation)."""
        parts = []
        if self.graph_breaks:
            parts.append(f"{self.graph_breaks} graph break{'s' * (self.graph_breaks != 1)}"
                         + (f" ({self.reasons[0]})" if self.reasons else ""))
        if self.recompiles:
            parts.append(f"{self.recompiles} recompilation{'s' * (self.recompiles != 1)} after the first call")

        if self.limit_hits:
            parts.append(f"hit torch's recompile limit ({recompile_limit()} per function) {self.limit_hits} "
                         "time(s): that code runs eagerly from then on")
        return "compiled: " + "; ".join(parts) if parts else ""


class _LimitHits(logging.Handler):
    """Counts torch._dynamo's warnings that a function hit the recompile limit (it then runs eagerly)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "hit config." in str(record.msg)


def first_calls(call: Callable[[Any], Any], batches: Sequence, passes: int = 2) -> CompileReport:
    """Run ``call`` on every batch ``passes`` times (the first call compiles; later shapes may
    recompile; the second pass shows whether any shape compiles again), counting graphs, graph breaks,
    recompilations and hits of torch's recompile limit, and the seconds it all took. Exceptions (a
    failed compilation) propagate."""
    hits, logger = _LimitHits(), logging.getLogger("torch._dynamo.convert_frame")
    logger.addHandler(hits)
    try:
        graphs0, breaks0, reasons0 = _counters()
        start = time.perf_counter()
        call(batches[0])
        graphs1, _, _ = _counters()
        for _ in range(passes):
            for x in batches:
                call(x)
        seconds = time.perf_counter() - start
    finally:
        logger.removeHandler(hits)
    graphs2, breaks2, reasons2 = _counters()
    new = [k for k, v in reasons2.items() if v > reasons0.get(k, 0)]
    return CompileReport(seconds, graphs1 - graphs0, breaks2 - breaks0, graphs2 - graphs1,
                         [str(k).strip().splitlines()[0] for k in new], hits.count)
