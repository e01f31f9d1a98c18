"""The score cache: single-unit profile scores reused by later runs of the same model, text
and space, and never served to another."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from searcher.cli import main
from searcher.pool import LocalPool
from searcher.score_cache import ScoreCache, cache_key

ARGS = ["--seq-len", "32", "--importance-windows", "2", "--validation-windows", "2",
        "--offspring", "4", "--stages", "1:2,2:1", "--threads", "1", "--evals", "12"]  # fmt: skip


def search(out: Path, model: Path, *extra: str) -> dict:
    assert main(["run", "--model", str(model), "--out", str(out), *ARGS, *extra]) == 0
    return json.loads((out / "run.json").read_text())


def scored(run_dir: Path) -> list:
    trials = pd.read_parquet(run_dir / "trials.parquet")
    return list(zip(trials["genes"].map(tuple), trials["kl"], strict=True))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SEARCHER_SCORE_CACHE", str(root))
    return root


def test_a_second_budget_reuses_the_profile_and_ends_where_an_uncached_run_does(
    cache: Path, tiny_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    first = search(tmp_path / "a", tiny_dir, "--budget", "flops=0.6")
    assert first["cached_evals"] == 0
    files = list(cache.glob("*.jsonl"))
    assert len(files) == 1 and files[0].read_text().count("\n") > 0

    jobs: list = []
    real = LocalPool.run

    def counting(self, batch, on_outcome=None):
        jobs.extend(batch)
        return real(self, batch, on_outcome)

    monkeypatch.setattr(LocalPool, "run", counting)
    second = search(tmp_path / "b", tiny_dir, "--budget", "flops=0.5")
    assert second["cached_evals"] > 0
    assert second["evals"] == pytest.approx(first["evals"], abs=2)  # it still counts them
    cached_jobs = sum(j.stop - j.start for j in jobs)

    monkeypatch.setenv("SEARCHER_SCORE_CACHE", "off")
    jobs.clear()
    uncached = search(tmp_path / "c", tiny_dir, "--budget", "flops=0.5")
    assert uncached["cached_evals"] == 0
    assert sum(j.stop - j.start for j in jobs) > cached_jobs  # the cache saved scoring
    assert scored(tmp_path / "b") == scored(tmp_path / "c")  # and changed nothing


@pytest.mark.parametrize(
    "change",
    ["model", "text", "space", "seq_len"],
)
def test_a_changed_model_text_or_space_is_never_served_stale_scores(
    change: str, cache: Path, tiny_dir: Path, tiny_qwen_dir: Path, tmp_path: Path
) -> None:
    search(tmp_path / "a", tiny_dir)
    model, extra = tiny_dir, []
    if change == "model":
        model = tiny_qwen_dir
    elif change == "text":
        text = tmp_path / "other.txt"
        text.write_text("A different calibration text, repeated. " * 400)
        extra = ["--data", str(text)]
    elif change == "space":
        extra = ["--space-option", "mlp_steps=4"]
    else:
        extra = ["--seq-len", "24"]
    again = search(tmp_path / "b", model, *extra)
    assert again["cached_evals"] == 0
    assert len(list(cache.glob("*.jsonl"))) == 2


def test_cache_key_follows_each_input() -> None:
    model = {"fingerprint": "f", "architecture": "A", "config": {"hidden_size": 8}}
    data = {"sha256": "t", "tokens": 100, "seq_len": 32, "source": "x"}
    space = {"name": "width", "options": {"mlp_steps": 8}, "fingerprint": "s"}
    scoring = {"dtype": "float32", "device": "cpu", "batch_size": 4, "importance_windows": 2}
    base = cache_key(model, data, space, scoring)
    assert cache_key(model, {**data, "source": "y"}, space, scoring) == base  # a name only
    for changed in (
        cache_key({**model, "fingerprint": "g"}, data, space, scoring),
        cache_key(model, {**data, "sha256": "u"}, space, scoring),
        cache_key(model, {**data, "seq_len": 16}, space, scoring),
        cache_key(model, data, {**space, "fingerprint": "r"}, scoring),
        cache_key(model, data, {**space, "options": {"mlp_steps": 4}}, scoring),
        cache_key(model, data, space, {**scoring, "dtype": "bfloat16"}),
    ):
        assert changed != base


def test_torn_and_foreign_lines_are_skipped(tmp_path: Path) -> None:
    cache = ScoreCache(tmp_path, "k", n_genes=2)
    cache.path.parent.mkdir(parents=True, exist_ok=True)
    good = {"candidate": [1, 0], "kl": [0.5, 0.25], "nll": [2.0, 2.0], "seconds": 0.1}
    short = {**good, "kl": [0.5], "nll": [2.0]}
    cache.path.write_text(
        "\n".join(
            [
                json.dumps(short),
                json.dumps(good),
                json.dumps({**good, "candidate": [1]}),
                '{"candidate": [0, 0], "kl": [0.',
            ]
        )  # fmt: skip
    )
    loaded = cache.load()
    assert list(loaded) == [(1, 0)] and list(loaded[(1, 0)].kl) == [0.5, 0.25]
    cache.path.write_bytes(cache.path.read_bytes() + b"\xff\xfe")  # torn mid-character

    class Scored:  # what add reads of a trial
        candidate, kl, nll, seconds = (0, 1), [0.125], [1.0], 0.2

    cache.add(Scored())  # starts on a line of its own, after the torn one
    again = cache.load()
    assert list(again) == [(1, 0), (0, 1)] and list(again[(0, 1)].kl) == [0.125]
