"""Evaluator: KL to the dense model (full and top-k references), batching, and NLL."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import spaces
from searcher.fitness import SCORE_BYTES, Evaluator, FloatHead
from searcher.pool import Job, LocalPool
from tests.helpers import tiny_model

SEQ = 16
N_WINDOWS = 7


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.double()


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, model.config.vocab_size, (N_WINDOWS, SEQ), generator=g)
    space = spaces.build("width", spaces.Structure.of(model), SEQ, windows[:4])
    rng = np.random.default_rng(0)
    cands = [tuple(int(rng.integers(0, n)) for n in space.n_levels) for _ in range(2)]
    cands.append((0,) * len(space.genes))
    space.apply(space.dense())
    dense_logits = logits(model, windows)
    full = Evaluator(model, windows, space.apply, space.dense(), batch_size=3)
    scores = {c: full.score(c, 0, N_WINDOWS) for c in cands}
    return SimpleNamespace(
        model=model,
        windows=windows,
        space=space,
        cands=cands,
        dense=dense_logits,
        full=full,
        scores=scores,
    )


def evaluator(setup, **kwargs) -> Evaluator:
    kwargs.setdefault("batch_size", 3)
    return Evaluator(setup.model, setup.windows, setup.space.apply, setup.space.dense(), **kwargs)


def direct_kl(setup, candidate) -> np.ndarray:
    """Mean over tokens of KL(softmax(dense) || softmax(candidate)), per window, in float64."""
    setup.space.apply(candidate)
    cand = logits(setup.model, setup.windows)
    setup.space.apply(setup.space.dense())
    logp = torch.log_softmax(setup.dense, -1)
    logq = torch.log_softmax(cand, -1)
    return (logp.exp() * (logp - logq)).sum(-1).mean(-1).numpy()


def test_dense_kl_is_zero_on_every_window(setup) -> None:
    for ev in (setup.full, evaluator(setup, reference_bytes=0, hidden_reference=False, top_k=8)):
        assert ev.n_windows == N_WINDOWS
        scored = ev.score(setup.space.dense(), 0, N_WINDOWS)
        assert scored.kl.shape == (N_WINDOWS,)
        assert np.all(np.abs(scored.kl) < 1e-5)
        np.testing.assert_allclose(ev.dense_scores.nll, scored.nll, rtol=1e-6)
    again = setup.full.score(setup.space.dense(), 2, 6)
    assert again.kl.shape == (4,) and np.all(np.abs(again.kl) < 1e-5)


def test_full_reference_kl_matches_direct_computation(setup) -> None:
    assert setup.full.top_k is None  # the reference fits: exact KL
    for c in setup.cands:
        got = setup.scores[c].kl
        expect = direct_kl(setup, c)
        assert np.all(expect > 1e-3)  # pruning visibly changes the output
        np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-6)


def test_top_k_with_the_whole_vocabulary_matches_full(setup) -> None:
    vocab = setup.model.config.vocab_size
    topk = evaluator(setup, reference_bytes=0, hidden_reference=False, top_k=10 * vocab)
    assert topk.top_k == vocab  # capped at the vocabulary
    for c in setup.cands:
        got = topk.score(c, 0, N_WINDOWS).kl
        np.testing.assert_allclose(got, setup.scores[c].kl, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [1, 20])
def test_small_top_k_is_a_lower_bound(setup, k: int) -> None:
    topk = evaluator(setup, reference_bytes=0, hidden_reference=False, top_k=k)
    assert topk.top_k == k
    for c in setup.cands:
        exact = setup.scores[c].kl
        bound = topk.score(c, 0, N_WINDOWS).kl
        assert np.all(bound <= exact + 1e-6)
        assert np.all(bound > 0)


def test_reference_bytes_threshold_decides_the_path(setup) -> None:
    ids = setup.windows[:1]
    need = ids.numel() * setup.model.config.vocab_size * 4
    apply, dense = setup.space.apply, setup.space.dense()
    assert (
        Evaluator(
            setup.model, ids, apply, dense, reference_bytes=need, hidden_reference=False
        ).top_k
        is None
    )
    assert (
        Evaluator(
            setup.model,
            ids,
            apply,
            dense,
            reference_bytes=need - 1,
            top_k=7,
            hidden_reference=False,
        ).top_k
        == 7
    )


RANGES = [(1, 5), (2, 3), (3, 7), (6, 7), (4, 6), (0, 1)]


def test_sub_ranges_equal_slices_of_the_whole_full_reference(setup) -> None:
    assert setup.full.batch_size == 3
    c = setup.cands[0]
    whole = setup.scores[c]
    assert whole.kl.shape == whole.nll.shape == (N_WINDOWS,)
    for start, stop in RANGES:
        part = setup.full.score(c, start, stop)
        assert part.kl.shape == part.nll.shape == (stop - start,)
        np.testing.assert_allclose(part.kl, whole.kl[start:stop], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(part.nll, whole.nll[start:stop], rtol=1e-5, atol=1e-7)


def test_sub_ranges_equal_slices_of_the_whole_top_k(setup) -> None:
    ev = evaluator(setup, batch_size=3, reference_bytes=0, hidden_reference=False, top_k=16)
    c = setup.cands[1]
    whole = ev.score(c, 0, N_WINDOWS)
    for start, stop in RANGES:
        part = ev.score(c, start, stop)
        np.testing.assert_allclose(part.kl, whole.kl[start:stop], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(part.nll, whole.nll[start:stop], rtol=1e-5, atol=1e-7)


def test_batch_size_does_not_change_scores(setup) -> None:
    c = setup.cands[0]
    a = setup.scores[c]
    for bs in (2, 7):
        other = evaluator(setup, batch_size=bs).score(c, 0, N_WINDOWS)
        np.testing.assert_allclose(a.kl, other.kl, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(a.nll, other.nll, rtol=1e-5, atol=1e-6)


def test_nll_matches_the_hugging_face_loss(setup) -> None:
    model, space = setup.model, setup.space
    checks = [
        (space.dense(), setup.full.dense_scores),
        (setup.cands[0], setup.scores[setup.cands[0]]),
    ]
    for c, scores in checks:
        space.apply(c)
        with torch.inference_mode():
            for i in (0, 3, 6):
                ids = setup.windows[i : i + 1]
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                assert scores.nll[i] == pytest.approx(float(loss), rel=1e-5, abs=1e-6)
            whole = model(input_ids=setup.windows, labels=setup.windows, use_cache=False).loss
        assert scores.nll.mean() == pytest.approx(float(whole), rel=1e-5)
        space.apply(space.dense())


def test_score_applies_the_candidate_each_time(setup) -> None:
    a, b = setup.cands[0], setup.cands[1]
    assert not np.allclose(setup.scores[a].kl, setup.scores[b].kl)
    setup.full.score(b, 0, 2)
    again = setup.full.score(a, 0, N_WINDOWS).kl
    np.testing.assert_allclose(again, setup.scores[a].kl, rtol=1e-6, atol=1e-9)


def test_local_pool_scores_job_ranges(setup) -> None:
    c = setup.cands[2]
    whole = setup.scores[c]
    out = LocalPool(setup.full).run([Job(c, 0, 2), Job(c, 2, 7), Job(setup.space.dense(), 3, 4)])
    assert len(out) == 3
    np.testing.assert_allclose(np.concatenate([out[0].kl, out[1].kl]), whole.kl, rtol=1e-5)
    np.testing.assert_allclose(out[1].nll, whole.nll[2:], rtol=1e-5)
    assert out[2].kl.shape == (1,) and abs(out[2].kl[0]) < 1e-5
    assert all(o.seconds >= 0 for o in out)


def test_hidden_reference_equals_probability_reference(setup) -> None:
    """The W^T p reference gives the same KL as full probabilities (and uses the head)."""
    probs = evaluator(setup, hidden_reference=False)
    assert setup.full.split_head and not probs.split_head and probs.top_k is None
    for c in setup.cands:
        np.testing.assert_allclose(
            probs.score(c, 0, N_WINDOWS).kl, setup.scores[c].kl, rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_dense_model_has_zero_kl_to_itself(dtype) -> None:
    """Logits, logsumexp and the reference share float32, so rounding is not scored as KL."""
    model = tiny_model("llama").to(dtype)
    windows = torch.randint(0, model.config.vocab_size, (3, SEQ), generator=torch.Generator())
    space = spaces.build("width", spaces.Structure.of(model), SEQ, windows)
    ev = Evaluator(model, windows, space.apply, space.dense(), batch_size=2)
    assert np.all(np.abs(ev.score(space.dense(), 0, 3).kl) < 1e-5)
    assert np.all(ev.score((0,) * len(space.genes), 0, 3).kl > 1e-3)


def test_half_precision_head_is_cast_a_block_at_a_time_to_the_same_scores() -> None:
    """A bfloat16 model's LM head is not copied to float32 whole (a bfloat16 8B model's copy
    is 2.1 GB): blocks of rows are cast as needed, and the logits and the W^T p reference
    equal those of a whole float32 copy."""
    model = tiny_model("llama").to(torch.bfloat16)
    head = model.get_output_embeddings()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, head.weight.shape[1], generator=g)
    p = torch.softmax(torch.randn(5, head.weight.shape[0], generator=g), -1)
    whole = head.weight.float()
    blocks = FloatHead(head, rows=7)  # not a divisor of the vocabulary
    assert blocks.weight.dtype == torch.bfloat16  # no float32 copy held
    torch.testing.assert_close(blocks.logits(hidden), hidden @ whole.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(blocks.project(p), p @ whole, rtol=1e-5, atol=1e-6)
    windows = torch.randint(0, model.config.vocab_size, (2, SEQ), generator=g)
    space = spaces.build("width", spaces.Structure.of(model), SEQ, windows)
    ev = Evaluator(model, windows, space.apply, space.dense(), batch_size=2)
    held = [t for t in vars(ev.float_head).values() if isinstance(t, torch.Tensor)]
    assert all(t.dtype != torch.float32 or t.numel() < head.weight.numel() for t in held)
    # a float32 model's head is used as it is, in one piece and without a copy
    fp32 = tiny_model("llama").get_output_embeddings()
    one = FloatHead(fp32)
    assert one.weight.data_ptr() == fp32.weight.data_ptr() and one.rows == fp32.weight.shape[0]


CHUNKS = [1, 3, 7]  # SEQ (16) as 16 x 1, 5 x 3 + 1, 6 + 6 + 4
PATHS = {
    "hidden": {},
    "probabilities": dict(hidden_reference=False),
    "top_k": dict(hidden_reference=False, reference_bytes=0, top_k=8),
}


@pytest.mark.parametrize("path", PATHS)
def test_chunked_scores_equal_whole_window_scores_in_float32(setup, path: str) -> None:
    """Logits, logsumexp, NLL and KL computed a few tokens at a time (chunks that do not
    divide the window) give the scores of whole windows, for every kind of reference, and
    the references themselves match."""
    whole = evaluator(setup, chunk_tokens=SEQ, **PATHS[path])
    assert whole.chunk_tokens == SEQ
    for chunk in CHUNKS:
        ev = evaluator(setup, chunk_tokens=chunk, **PATHS[path])
        assert ev.chunk_tokens == chunk and ev.split_head == (path == "hidden")
        np.testing.assert_allclose(
            ev.dense_scores.nll, whole.dense_scores.nll, rtol=1e-6, atol=1e-6
        )
        for a, b in zip(ev.reference().summaries, whole.reference().summaries):
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)
        for c in setup.cands:
            got, want = ev.score(c, 0, N_WINDOWS), whole.score(c, 0, N_WINDOWS)
            np.testing.assert_allclose(got.kl, want.kl, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(got.nll, want.nll, rtol=1e-6, atol=1e-6)
        part = ev.score(setup.cands[0], 2, 5)  # sub-ranges too
        np.testing.assert_allclose(part.kl, whole.score(setup.cands[0], 2, 5).kl, atol=1e-6)


@pytest.mark.parametrize("path", ["hidden", "top_k"])
def test_chunked_scores_equal_whole_window_scores_in_bfloat16(path: str) -> None:
    """A bfloat16 model's LM head is cast a block of rows at a time for each chunk: the
    scores are those of whole windows up to float noise, and the dense model still scores
    zero KL."""
    model = tiny_model("llama").to(torch.bfloat16)
    windows = torch.randint(0, model.config.vocab_size, (3, SEQ), generator=torch.Generator())
    space = spaces.build("width", spaces.Structure.of(model), SEQ, windows)
    cands = [(0,) * len(space.genes), tuple(n // 2 for n in space.n_levels)]

    def build(chunk: int) -> Evaluator:
        return Evaluator(
            model, windows, space.apply, space.dense(), 2, chunk_tokens=chunk, **PATHS[path]
        )

    whole = build(SEQ)
    for chunk in (3, 7):
        ev = build(chunk)
        np.testing.assert_allclose(ev.dense_scores.nll, whole.dense_scores.nll, atol=1e-5)
        assert np.all(np.abs(ev.score(space.dense(), 0, 3).kl) < 1e-5)
        for c in cands:
            got, want = ev.score(c, 0, 3), whole.score(c, 0, 3)
            assert np.all(want.kl > 1e-3)
            np.testing.assert_allclose(got.kl, want.kl, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got.nll, want.nll, rtol=1e-5, atol=1e-5)


def test_logits_exist_for_one_chunk_of_tokens_at_a_time(setup, monkeypatch) -> None:
    """No batch of full-vocabulary float32 logits: the head is applied to at most
    ``chunk_tokens`` tokens at once, in the dense pass and in scoring; by default a chunk's
    logits are about ``SCORE_BYTES``."""
    seen: list[int] = []
    original = FloatHead.logits

    def logits_of(self, hidden):
        seen.append(hidden.shape[:-1].numel())
        return original(self, hidden)

    monkeypatch.setattr(FloatHead, "logits", logits_of)
    ev = evaluator(setup, chunk_tokens=7, batch_size=4)
    ev.score(setup.cands[0], 0, N_WINDOWS)
    # each window of 16 tokens in as few chunks of at most 7 as fit, one size but the last
    assert sorted(set(seen)) == [4, 6] and sum(seen) == 2 * N_WINDOWS * SEQ
    vocab = setup.model.config.vocab_size
    assert evaluator(setup).chunk_tokens == SCORE_BYTES // (4 * vocab)
    with pytest.raises(ValueError):
        evaluator(setup, chunk_tokens=0)
