"""Single-unit profile scores shared between runs (Puzzletron's point: scoring is the
expensive part, and a new budget should not redo it).

A profile candidate (one gene or one layer lowered alone, the rest dense) scores the same
whatever the budget or the algorithm, so its per-window KL is kept in a file named by a hash
of everything the score depends on: the model's weights and shapes, the calibration text
and how it is cut, the space with the choices it fixed from that text (its fingerprint),
the dtype, device and batch size. A changed model, text or space hashes elsewhere and is
never served a stale score. Later runs replay these scores like a resumed run replays its
own log, so they count toward ``--evals`` as before (a run's path does not depend on the
cache) but take no time.

The file is append-only JSON lines, one per scored candidate: a kill mid-write leaves at
most a torn last line, which is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from searcher.engine import Trial
from searcher.pool import Outcome
from searcher.problem import Candidate

log = logging.getLogger(__name__)

FORMAT = 1
ENV = "SEARCHER_SCORE_CACHE"  # the scores' directory; "off" disables the cache


def cache_root() -> Path | None:
    """``$SEARCHER_SCORE_CACHE``, else ``scores/`` in searcher's cache (beside the converted
    embedded model: ``$SEARCHER_CACHE`` or ~/.cache/searcher); None when set to "off"."""
    from searcher.models import cache_root as searcher_cache

    value = os.environ.get(ENV)
    if value is not None and value.strip().lower() in ("off", "none", "0", ""):
        return None
    return Path(value).expanduser() if value else searcher_cache() / "scores"


def cache_key(
    model: Mapping[str, Any], data: Mapping[str, Any], space: Mapping[str, Any],
    scoring: Mapping[str, Any],
) -> str:  # fmt: skip
    """The hash naming a cache file: what a single-unit score depends on.

    ``model``: the loaded model's identity (weight fingerprint, architecture, config);
    ``data``: the text's sha256 and how it is cut (seq_len); ``space``: name, options and
    fingerprint; ``scoring``: dtype, device, batch size, importance windows."""
    fields = {
        "format": FORMAT,
        "model": {k: model.get(k) for k in ("fingerprint", "architecture", "config")},
        "data": {k: data.get(k) for k in ("sha256", "tokens", "seq_len")},
        "space": dict(space),
        "scoring": dict(scoring),
    }
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class ScoreCache:
    """One key's scores: ``load`` them, ``add`` new ones as they are scored."""

    def __init__(self, root: Path, key: str, n_genes: int) -> None:
        self.path = root / f"{key}.jsonl"
        self.n_genes = n_genes
        self.added = 0
        self.failed = False

    def load(self) -> dict[Candidate, Outcome]:
        """Every candidate's longest record (more windows win); torn or foreign lines are
        skipped."""
        out: dict[Candidate, Outcome] = {}
        try:
            lines = self.path.read_bytes().split(b"\n")
        except OSError:
            return out
        for line in lines:
            try:
                rec = json.loads(line.decode())
                candidate = tuple(int(x) for x in rec["candidate"])
                kl = np.asarray(rec["kl"], dtype=float)
                nll = np.asarray(rec["nll"], dtype=float)
                seconds = float(rec["seconds"])
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                continue
            if len(candidate) != self.n_genes or len(kl) != len(nll) or not len(kl):
                continue
            if candidate not in out or len(out[candidate].kl) < len(kl):
                out[candidate] = Outcome(kl, nll, seconds)
        return out

    def _last_byte(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1)

    def add(self, trial: Trial) -> None:
        """Append the trial's scores (one line, written at once)."""
        line = json.dumps({
            "candidate": list(trial.candidate), "kl": trial.kl, "nll": trial.nll,
            "seconds": trial.seconds,
        })  # fmt: skip
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as f:
                torn = f.tell() > 0 and self._last_byte() != b"\n"  # a kill mid-write before
                f.write((("\n" if torn else "") + line + "\n").encode())
            self.added += 1
        except OSError as exc:  # a cache that cannot be written costs time later, not the run
            if not self.failed:
                log.warning("score cache %s not written: %s", self.path, exc.strerror)
            self.failed = True
