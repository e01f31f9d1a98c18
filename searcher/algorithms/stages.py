"""Multi-stage selection settings: ``--stages`` as WINDOWS:SURVIVORS per stage.

Here, not in ``evolution``, because the one-shot allocations read the first stage too and
``evolution`` imports them (its ``--init`` seeds).
"""

from __future__ import annotations

from searcher.errors import SearcherError

DEFAULT_STAGES = ((1, 4), (4, 1))
# --select trained: window evaluations a training step counts per window it trains on (a
# dense teacher forward pass, the student's forward pass and its backward pass, about two)
STEP_COST = 4


def parse_stages(text: str) -> tuple[tuple[int, int], ...]:
    """``"1:4,4:1"`` -> ((1, 4), (4, 1)): windows:survivors per stage."""
    try:
        stages = tuple((int(w), int(s)) for w, s in (part.split(":") for part in text.split(",")))
    except ValueError:
        raise SearcherError(
            f"bad --stages {text!r}: give WINDOWS:SURVIVORS per stage, e.g. 1:4,4:1"
        ) from None
    windows = [w for w, _ in stages]
    survivors = [s for _, s in stages]
    if (
        not stages
        or min(windows) < 1
        or min(survivors) < 1
        or windows != sorted(set(windows))
        or survivors != sorted(survivors, reverse=True)
    ):
        raise SearcherError(
            f"bad --stages {text!r}: windows must increase, survivors must not increase, "
            "and all must be positive"
        )
    return stages


def first_stage_windows(stages: str | None) -> int:
    """Windows of the first selection stage (``"1:4,4:1"`` -> 1): the cheapest fidelity."""
    return (parse_stages(stages) if stages else DEFAULT_STAGES)[0][0]


def parse_select(text: str | None) -> int:
    """``--select``: ``plain`` (0) or ``trained:STEPS`` (STEPS distillation steps for each
    survivor of the last selection stage before its final score, as DarwinLM does)."""
    if text in (None, "", "plain"):
        return 0
    kind, _, steps = text.partition(":")
    if kind == "trained" and steps.isdigit() and int(steps) >= 1:
        return int(steps)
    raise SearcherError(
        f"bad --select {text!r}: give plain, or trained:STEPS with STEPS at least 1 (e.g. "
        "trained:10)"
    )
