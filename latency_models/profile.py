"""Building a latency table on a device: time blocks, fixed parts, then fit a correction.

Each block size is timed in a graph of as many blocks as the model has layers, each with its
own layer's weights (sliced to the size). A single block timed alone would keep its weights
in cache between repeats and look faster than it is inside the model, where every layer's
weights stream from memory; the stack reproduces that traffic (``stack``, the default).
``context`` times a block size beside the blocks that run before it in each layer instead:
attention sizes as stacks of attention blocks, MLP sizes in graphs whose every layer has its
whole attention block, less the same graph without MLPs, so that the parts add up to the
dense model by construction. On a quiet AMD EPYC VM (100 width candidates, each method's table
predicting the same measurements) ``stack`` put 96% of prefill and 100% of decode shares
within 10% of the measured, ``context`` 98% and 92%; on a quiet Intel Xeon VM ``stack`` gave
99% / 100% (before the per-call constant below): ``stack`` stays the default. The fixed
parts are the embedding, final norm and LM head. A correction through the dense model,
timed whole, absorbs what the sum of parts misses: a scale, and a per-call constant fitted
to whole models' shares of the dense one (``WorkloadTable.fit_correction``).

Shared machines change speed from one minute to the next. So graphs are timed in groups,
round-robin, each group beside the same reference graph, and every latency is the reference's
overall median times the graph's median ratio to the reference within its group: a slow
minute slows the graph and its reference alike and cancels out.
"""

from __future__ import annotations

import datetime as dt
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from typing import Any

from latency_models.backends import Backend, Timing
from latency_models.graph import DecoderWeights
from latency_models.latency_table import Block, LatencyTable, WorkloadTable
from latency_models.workload import Workload

Step = Callable[[str], None]

BLOCK_TIMING = Timing(warmup=1, repeats=5, min_seconds=0.3)

METHODS = {
    "context": "each size beside the blocks that run before it in every layer: attention "
    "sizes as stacks of attention blocks, MLP sizes after whole attention blocks, each less "
    "the same graph without its blocks",
    "stack": "each size as a stack of that kind's blocks alone, less an empty call",
}
BLOCK_ORDER = ("attn", "mlp")  # the order of a layer's blocks
MODEL_TIMING = Timing(warmup=2, repeats=5, min_seconds=0.3)


def architecture(weights: DecoderWeights) -> dict[str, Any]:
    """The shapes a table is valid for (weights do not change dense-kernel latency)."""
    attn = [a for a, _ in weights.layers if a is not None]
    mlp = [m for _, m in weights.layers if m is not None]
    a = attn[0]
    assert weights.embed is not None and weights.head is not None
    return {
        "layers": len(weights.layers),
        "hidden": weights.hidden,
        "kv_heads": a.groups,
        "group_size": a.group_size,
        "head_dim": a.head_dim,
        "intermediate": mlp[0].width,
        "vocab": weights.head.shape[0],
        "tied": weights.head is weights.embed,
        "bias": a.q_bias is not None,
        "qk_norm": a.q_norm is not None,
        "dtype": str(weights.embed.dtype).removeprefix("torch."),
    }


def block_stack(dense: DecoderWeights, kind: str, size: int) -> DecoderWeights:
    """Every layer's ``kind`` block cut to ``size``, chained on hidden states."""
    layers = []
    for attn, mlp in dense.layers:
        if kind == "attn":
            assert attn is not None
            layers.append((attn.sliced(size), None))
        else:
            assert mlp is not None
            layers.append((None, mlp.sliced(size)))
    return dense.without_ends(layers)


def in_context(
    dense: DecoderWeights, kind: str, size: int, context: Sequence[str]
) -> DecoderWeights:
    """The dense model's layers (without the ends) with every ``kind`` block cut to ``size``
    (0: removed), the blocks of the ``context`` kinds whole, and any other kind's removed."""
    layers = []
    for attn, mlp in dense.layers:
        assert attn is not None and mlp is not None
        a = (attn.sliced(size) if size else None) if kind == "attn" else attn
        m = (mlp.sliced(size) if size else None) if kind == "mlp" else mlp
        layers.append((a if "attn" in (kind, *context) else None,
                       m if "mlp" in (kind, *context) else None))  # fmt: skip
    return dense.without_ends(layers)


def dense_blocks(dense: DecoderWeights) -> list[Block]:
    """The blocks of ``dense`` as a table prices them: every attention and MLP at its size."""
    out: list[Block] = []
    for attn, mlp in dense.layers:
        if attn is not None:
            out.append(("attn", attn.groups))
        if mlp is not None:
            out.append(("mlp", mlp.width))
    return out


def measure_beside(
    backend: Backend,
    items: Sequence[DecoderWeights],
    reference: DecoderWeights,
    workload: Workload,
    timing: Timing,
    max_bytes: int,
    on_group: Callable[[int, int], None] = lambda done, total: None,
) -> tuple[list[float], float]:
    """Latency (ms) of each item, timed in groups of at most ``max_bytes`` of weights, each
    group interleaved with ``reference``, and the reference's own; see the module's
    docstring."""
    groups: list[list[int]] = []
    size = max_bytes + 1
    for i, item in enumerate(items):
        b = item.nbytes()
        if size + b > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += b
    refs: list[float] = []
    ratios: dict[int, float] = {}
    for g, group in enumerate(groups):
        ms = backend.measure_many([reference, *(items[i] for i in group)], workload, timing)
        refs.append(ms[0].median_ms)
        for i, m in zip(group, ms[1:]):
            ratios[i] = m.ratio(ms[0])
        on_group(g + 1, len(groups))
    ref_ms = statistics.median(refs)
    return [ratios[i] * ref_ms for i in range(len(items))], ref_ms


def profile_workload(
    backend: Backend,
    dense: DecoderWeights,
    workload: Workload,
    shapes: dict[str, Sequence[int]],
    timing: Timing = BLOCK_TIMING,
    on_step: Step = lambda text: None,
    method: str = "stack",
) -> WorkloadTable:
    """One workload's table; ``method`` says how a block size is timed (see ``METHODS``)."""
    if method not in METHODS:
        raise ValueError(f"unknown profiling method {method!r}: one of {', '.join(METHODS)}")
    n = len(dense.layers)
    sizes = [(kind, size) for kind, ss in shapes.items() for size in sorted(set(ss) - {0})]
    items = [dense.without_ends([]), dense.ends_only()]
    if method == "context":
        # a kind's sizes are timed beside the kinds before it in a layer, whole: what it adds
        # to them is its cost there (attention alone; an MLP after whole attention blocks)
        kinds = [k for k in BLOCK_ORDER if k in shapes]
        context = {k: kinds[:i] for i, k in enumerate(kinds)}
        bases = kinds
        items += [in_context(dense, kind, 0, context[kind]) for kind in bases]
        items += [in_context(dense, kind, size, context[kind]) for kind, size in sizes]
        reference = dense.without_ends(dense.layers)
    else:
        bases = []
        items += [block_stack(dense, kind, size) for kind, size in sizes]
        mlp = shapes.get("mlp")
        reference = block_stack(dense, "mlp", max(mlp)) if mlp else dense.ends_only()
    ms, _ = measure_beside(
        backend, items, reference, workload, timing, dense.nbytes(),
        lambda done, total: on_step(f"{workload.kind}: block group {done}/{total}"),
    )  # fmt: skip
    call, fixed = ms[0], ms[1]
    base = dict(zip(bases, ms[2 : 2 + len(bases)]))
    blocks: dict[str, dict[int, float]] = {}
    for (kind, size), t in zip(sizes, ms[2 + len(bases) :]):
        # Under noise a graph with small blocks can time below the one without them; a
        # negative block time would predict that keeping the block is faster than removing it.
        blocks.setdefault(kind, {})[size] = max(t - base.get(kind, call), 0.0) / n
    return WorkloadTable(workload, fixed, {k: _nondecreasing(d) for k, d in blocks.items()}, call)


def _nondecreasing(times: dict[int, float]) -> dict[int, float]:
    """Block times made to grow with the block's size: where noise times a block faster than a
    smaller one (blocks whose sizes differ little, on a busy machine), the sizes out of order
    are pooled to their mean (isotonic regression). On a CPU a wider dense matmul is never
    faster, so an inversion is noise; the search itself does not need costs that grow with
    the level (``searcher.problem``), only this profiler assumes it of CPU kernels."""
    sizes = sorted(times)
    pools: list[tuple[float, int]] = []  # (sum of times, number of sizes), in size order
    for size in sizes:
        total, count = times[size], 1
        while pools and pools[-1][0] / pools[-1][1] > total / count:
            t, c = pools.pop()
            total, count = total + t, count + c
        pools.append((total, count))
    pooled = [total / count for total, count in pools for _ in range(count)]
    return dict(zip(sizes, pooled))


def profile(
    backend: Backend,
    dense: DecoderWeights,
    workloads: Sequence[Workload],
    shapes: dict[str, Sequence[int]],
    corrections: Iterable[tuple[list[Block], Callable[[], DecoderWeights]]],
    block_timing: Timing = BLOCK_TIMING,
    model_timing: Timing = MODEL_TIMING,
    on_step: Step = lambda text: None,
    method: str = "stack",
) -> LatencyTable:
    """A latency table for ``dense``'s architecture on ``backend``.

    ``shapes`` lists the sizes to time per block kind; ``corrections`` are whole models (their
    blocks, and a function giving their weights) measured end to end, beside the dense model,
    to fit the correction.
    """
    start = time.perf_counter()
    tables = {
        wl.kind: profile_workload(backend, dense, wl, shapes, block_timing, on_step, method)
        for wl in workloads
    }
    models = list(corrections)
    if models:
        on_step("correction: whole models")
        weights = [make() for _, make in models]
        for kind, table in tables.items():
            measured, dense_ms = measure_beside(
                backend, weights, dense, table.workload, model_timing, dense.nbytes(),
                lambda done, total, kind=kind: on_step(
                    f"correction ({kind}): whole models, group {done}/{total}"
                ),
            )  # fmt: skip
            # every model was timed beside the dense one: the fit goes through it (when the
            # table has the dense model's block sizes)
            full = dense_blocks(dense)
            has = all(size in table.blocks.get(kind, {}) for kind, size in full)
            anchor = (table.raw(full), dense_ms) if has else None
            table.fit_correction([table.raw(blocks) for blocks, _ in models], measured, anchor)
    info = {
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - start, 1),
        "corrections": len(models),
        "method": method,
        "timing": {"blocks": asdict(block_timing), "models": asdict(model_timing)},
    }
    return LatencyTable(backend.fingerprint(), architecture(dense), tables, info)
