"""Healing: distillation lowers held-out KL, resumes exactly after a kill, keeps sparsity masks,
and writes a pruned export that loads like any other (and that ``searcher eval`` scores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import searcher.heal as heal_module
import spaces
from searcher.cli import main
from searcher.evaluate import evaluate
from searcher.export import load_pruned
from searcher.fitness import Evaluator
from searcher.heal import (
    HealSettings,
    HeldOut,
    Split,
    Trainer,
    chunked_distillation_loss,
    distillation_loss,
    order,
    score,
    shared_pruned,
)
from tests.helpers import logits, random_windows, tiny_model
from tests.test_export_hf import load_without_searcher

TINY = ["--seq-len", "32", "--importance-windows", "2", "--validation-windows", "2",
        "--offspring", "4", "--stages", "1:2,2:1", "--threads", "1", "--evals", "4"]  # fmt: skip
SETTINGS = HealSettings(steps=12, seq_len=32, validation_windows=4, lr=1e-3, checkpoint_every=4)


def _flags(s: HealSettings) -> list[str]:
    return ["--steps", str(s.steps), "--seq-len", str(s.seq_len), "--validation-windows",
            str(s.validation_windows), "--lr", str(s.lr), "--checkpoint-every",
            str(s.checkpoint_every), "--threads", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tiny_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """A width run at flops=0.5 and a sparsity run at 60% of the tiny Llama."""
    root = tmp_path_factory.mktemp("heal-runs")
    out = {}
    for space, budget in (("width", "flops=0.5"), ("sparsity", "sparsity=0.6")):
        out[space] = root / space
        args = ["run", "--model", str(tiny_dir), "--space", space, "--budget", budget]
        assert main([*args, "--out", str(out[space]), *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def healed(runs, tmp_path_factory) -> dict[str, Path]:
    """The width run healed in full and with LoRA, the sparsity run in full, and the width
    run's unhealed export."""
    root = tmp_path_factory.mktemp("healed")
    out = {"width": root / "width", "lora": root / "lora", "sparsity": root / "sparsity"}
    assert main(["heal", str(runs["width"]), "--out", str(out["width"]), *_flags(SETTINGS)]) == 0
    lora = [*_flags(SETTINGS), "--lora", "2", "--lr", "0.01"]  # adapters start at zero
    assert main(["heal", str(runs["width"]), "--out", str(out["lora"]), *lora]) == 0
    assert main(["heal", str(runs["sparsity"]), "--out", str(out["sparsity"]),
                 *_flags(SETTINGS)]) == 0  # fmt: skip
    for space in ("width", "sparsity"):
        out[f"{space}-unhealed"] = root / f"{space}-unhealed"
        args = ["export", str(runs[space]), "--format", "pruned"]
        assert main([*args, "--out", str(out[f"{space}-unhealed"])]) == 0
    return out


def _heal_json(path: Path) -> dict:
    return json.loads((path / "heal.json").read_text())


@pytest.mark.parametrize("case", ["width", "lora", "sparsity"])
def test_healing_lowers_held_out_kl(healed, case) -> None:
    h = _heal_json(healed[case])
    # (rank-2 adapters on a random model 64 wide move least; the figures are seeded)
    assert h["after"]["kl"] < (0.99 if case == "lora" else 0.95) * h["before"]["kl"]
    assert h["after"]["ppl"] < h["before"]["ppl"]
    assert h["steps"] == 12 and h["tokens"] == 12 * 4 * 32
    assert [c["step"] for c in h["curve"]] == [0, 4, 8, 12]
    assert h["curve"][0]["kl"] == h["before"]["kl"]
    assert h["curve"][-1]["kl"] == pytest.approx(h["after"]["kl"], rel=1e-5)
    assert h["memory"]["peak_rss_mib"] > 0 and h["train_seconds"] > 0
    assert not (healed[case] / "checkpoints").exists()  # removed once the model is written
    d = h["data"]
    assert d["held_out_windows"] == 4 and d["training_windows"] + 4 == d["tokens"] // 32


def test_lora_trains_fewer_parameters_and_merges(healed) -> None:
    full, lora = _heal_json(healed["width"]), _heal_json(healed["lora"])
    assert lora["mode"] == "lora r=2" and full["mode"] == "full"
    assert lora["trained_parameters"] < full["trained_parameters"] / 5
    names = load_file(healed["lora"] / "model.safetensors").keys()
    assert not any("lora" in n for n in names)  # merged: a plain model
    assert names == load_file(healed["width-unhealed"] / "model.safetensors").keys()


def test_eval_scores_a_model_directory(healed, runs, tmp_path: Path, capsys) -> None:
    """``searcher eval DIR`` reproduces heal.json on the held-out windows, the search's
    validation KL on an unhealed export, and ranks healed above unhealed on other text."""
    h = _heal_json(healed["width"])
    got = evaluate(str(healed["width"]))
    assert got["healed"] and got["windows"] == 4
    assert got["kl"] == pytest.approx(h["after"]["kl"], rel=1e-5)
    best = json.loads((runs["width"] / "best.json").read_text())
    unhealed = evaluate(str(healed["width-unhealed"]))
    assert unhealed["kl"] == pytest.approx(best["validation"]["kl"], rel=1e-4)
    other = tmp_path / "other.txt"
    other.write_text(" ".join(f"word{i % 97} of line {i}." for i in range(3000)))
    cases = ("width", "width-unhealed")
    scores = [evaluate(str(healed[c]), str(other), windows=4)["kl"] for c in cases]
    assert scores[0] < scores[1]
    # the run directory itself is its best config
    assert evaluate(str(runs["width"]))["kl"] == pytest.approx(best["validation"]["kl"], rel=1e-4)
    assert main(["eval", str(healed["width"]), "--threads", "1"]) == 0
    assert "held-out windows" in capsys.readouterr().out


def test_sparsity_masks_stay_exactly_zero(healed) -> None:
    h = _heal_json(healed["sparsity"])
    assert h["pruned_weights_nonzero"] == 0
    trained = load_file(healed["sparsity"] / "model.safetensors")
    before = load_file(healed["sparsity-unhealed"] / "model.safetensors")
    pruned = [n for n in before if n.endswith("_proj.weight")]
    zeros = 0
    for n in pruned:
        mask = before[n] == 0
        zeros += int(mask.sum())
        assert bool((trained[n][mask] == 0).all()), n
    assert zeros > 0.5 * sum(before[n].numel() for n in pruned)
    assert any(not torch.equal(trained[n], before[n]) for n in pruned)  # trained elsewhere


def test_healed_export_loads_like_any_pruned_export(healed, tmp_path: Path) -> None:
    """Plain transformers, in a process where searcher cannot be imported, gives the logits of
    searcher's own loader."""
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(3))
    dirs = [str(healed[c]) for c in ("width", "lora", "sparsity")]
    got = load_without_searcher(tmp_path, dirs, ids)
    assert got["searcher_importable"] is False
    for d in dirs:
        plain = torch.tensor(got["models"][d]["logits"])
        assert torch.allclose(plain, logits(load_pruned(d), ids), atol=1e-5), d


KILLED = """
import json, os, signal, sys
import torch
from searcher.heal import HealSettings, heal
torch.set_num_threads(1)
run, out, settings, kill_at, resume = json.loads(sys.argv[1])
def on_step(state):
    if state.step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
heal(run, out, HealSettings(**settings), resume=resume, on_step=on_step)
"""


def _heal_process(run: Path, out: Path, kill_at: int | None = None, resume: bool = False):
    args = json.dumps([str(run), str(out), asdict(SETTINGS), kill_at, resume])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", KILLED, args], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def test_resume_after_a_kill_equals_an_uninterrupted_heal(runs, tmp_path: Path) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert _heal_process(runs["width"], whole).returncode == 0
    proc = _heal_process(runs["width"], killed, kill_at=6)  # after the checkpoint at 4
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p.name for p in (killed / "checkpoints").iterdir()] == ["step-00000004"]
    assert not (killed / "heal.json").exists()
    proc = _heal_process(runs["width"], killed, resume=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = (load_file(p / "model.safetensors") for p in (whole, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = _heal_json(whole), _heal_json(killed)
    assert ha["losses"] == hb["losses"] and ha["after"] == hb["after"]


def test_heal_refuses_bad_input_in_one_line(runs, healed, tmp_path: Path, capsys) -> None:
    cases = [
        (["heal", str(runs["sparsity"]), "--out", str(tmp_path / "a"), "--lora", "2"], "--lora"),
        (["heal", str(runs["width"]), "--out", str(tmp_path / "b"), "--resume"], "no heal"),
        (["heal", str(runs["width"]), "--out", str(healed["width"])], "--resume"),
        (["heal", str(runs["width"]), "--out", str(tmp_path / "c"), "--steps", "0"], "--steps"),
        (["heal", str(runs["width"]), "--out", str(tmp_path / "d"), "--warmup", "1.5"], "warmup"),
        (["heal", str(tmp_path), "--out", str(tmp_path / "e")], "not a finished"),
        (["heal", str(runs["width"]), "--out", str(runs["width"])], "overwrite"),
        (["eval", str(tmp_path)], "neither a searcher run"),
    ]
    if not torch.cuda.is_available():
        cases.append(
            (["heal", str(runs["width"]), "--out", str(tmp_path / "f"), "--device", "cuda"], "CUDA")
        )
    for args, words in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("searcher: error:") and "\n" not in err and words in err, err


def test_heal_rebuilds_the_run_in_its_own_batches(runs, tmp_path: Path, monkeypatch) -> None:
    """--batch-size is the heal's: the session (whose importance statistics pick the units)
    is rebuilt with the run's batch size, else a near-tie can pick other units and refuse."""
    import searcher.run

    seen = []
    rebuild = searcher.run.session_of_config

    def spy(*args, **kwargs):
        seen.append(args[5] if len(args) > 5 else kwargs.get("batch_size"))
        return rebuild(*args, **kwargs)

    monkeypatch.setattr(searcher.run, "session_of_config", spy)
    flags = [*_flags(SETTINGS), "--batch-size", "2", "--steps", "2"]
    assert main(["heal", str(runs["width"]), "--out", str(tmp_path / "h"), *flags]) == 0
    assert seen == [None]
    assert _heal_json(tmp_path / "h")["settings"]["batch_size"] == 2


def test_checkpointed_heal_maps_activations_apart_while_training(
    runs, tmp_path: Path, monkeypatch
) -> None:
    """With --gradient-checkpointing the heal trains under the lower mmap threshold and puts
    the default back after training; the healed model is what the plain heal makes (the
    same gradients: same held-out KL)."""
    calls: list[int] = []
    real = heal_module.return_large_buffers
    monkeypatch.setattr(heal_module, "return_large_buffers", lambda t: calls.append(t) or real(t))
    flags = [*_flags(SETTINGS), "--steps", "2", "--eval-every", "2"]
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    assert main(["heal", str(runs["width"]), "--out", str(plain), *flags]) == 0
    assert calls == []
    args = ["heal", str(runs["width"]), "--out", str(ckpt), *flags, "--gradient-checkpointing"]
    assert main(args) == 0
    assert calls == [heal_module.CHECKPOINTED_THRESHOLD, heal_module.THRESHOLD]
    want, got = _heal_json(plain)["after"]["kl"], _heal_json(ckpt)["after"]["kl"]
    assert got == pytest.approx(want, rel=1e-5)


def test_resume_with_other_settings_is_refused(runs, tmp_path: Path, capsys) -> None:
    out = tmp_path / "h"
    assert _heal_process(runs["width"], out, kill_at=5).returncode == -9
    flags = _flags(SETTINGS)
    flags[flags.index("--lr") + 1] = "0.002"
    assert main(["heal", str(runs["width"]), "--out", str(out), "--resume", *flags]) == 2
    assert "lr" in capsys.readouterr().err


def test_held_out_windows_are_the_last_and_never_trained_on() -> None:
    from searcher import data
    from tests.helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    text = data.read_text(None)
    win = data.held_out(tok, text, 32, 4)
    every = data.tokenize(tok, text[0])
    n = len(every) // 32
    assert len(win.validation) == 4 and len(win.calibration) == n - 4
    # training windows then held-out windows: every window of the text once, none shared
    assert torch.equal(torch.cat([win.calibration, win.validation]).flatten(), every[: n * 32])


def test_distillation_loss_is_kl_and_order_is_a_seeded_pass() -> None:
    z = torch.randn(2, 5, 11)
    assert float(distillation_loss(z, z)) == pytest.approx(0.0, abs=1e-6)
    t = torch.randn(2, 5, 11)
    p, logq = t.softmax(-1), z.log_softmax(-1)
    want = (p * (p.log() - logq)).sum(-1).mean()
    assert float(distillation_loss(z, t)) == pytest.approx(float(want), rel=1e-5)
    # every window once per pass, in an order that depends on the seed and the step only
    first = torch.cat([order(10, 0, s, 2) for s in range(5)])
    assert sorted(first.tolist()) == list(range(10))
    assert torch.equal(order(10, 0, 3, 2), order(10, 0, 3, 2))
    assert not torch.equal(torch.cat([order(10, 1, s, 2) for s in range(5)]), first)
    s = HealSettings(steps=10, warmup=0.2, lr=1.0)
    assert [round(s.rate(i), 6) for i in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert s.rate(9) < 0.05 and s.rate(5) < s.rate(3)


# a joint candidate of the tiny Llama: MLP and attention widths that differ from layer to layer,
# layer 1 removed whole (both blocks), layer 0's attention kept at its narrowest
JOINT = (1, 5, 0, 0, 3, 9)


@pytest.fixture(scope="module")
def pruned() -> tuple[torch.nn.Module, spaces.SearchSpace, torch.Tensor]:
    """The tiny Llama (dense, the teacher), its joint space and windows of 13 tokens."""
    teacher = tiny_model()
    windows = random_windows(teacher, 6, 13)
    space = spaces.build("joint", spaces.Structure.of(teacher), 13, windows)
    assert all(0 <= g < n for g, n in zip(JOINT, space.n_levels, strict=True))
    return teacher, space, windows


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and a
    for n in a:
        scale = float(a[n].abs().max()) or 1.0
        assert float((a[n] - b[n]).abs().max()) <= tol * scale, n


@pytest.mark.parametrize("head", ["trained", "frozen", "logits"])
def test_chunked_loss_equals_the_whole_loss(pruned, head) -> None:
    """Value and gradients of every student weight (the tied embedding/LM head included when
    trained) match KL on whole logits, with a chunk that does not divide the 26 tokens."""
    teacher, space, windows = pruned
    student = space.materialize(JOINT).requires_grad_(True)
    if head == "frozen":
        student.get_output_embeddings().requires_grad_(False)
    ids = windows[:2]
    whole = distillation_loss(student(input_ids=ids).logits, logits(teacher, ids))
    whole.backward()
    want = _grads(student)
    student.zero_grad(set_to_none=True)
    s, t = Split(student, ids[:1, :5]), Split(teacher, ids[:1, :5])
    assert s.weight is not None and t.weight is not None  # the Llama splits at its head
    if head == "logits":  # a model that is not split: its logits are its features
        s.weight = t.weight = None
    with torch.no_grad():
        target = t.features(ids).flatten(0, 1)
    got = chunked_distillation_loss(s.features(ids).flatten(0, 1), target, s.head, t.head, 7)
    got.backward()
    assert got.item() == pytest.approx(whole.item(), rel=1e-6)
    assert ("model.embed_tokens.weight" in want) == (head != "frozen")
    _close(want, _grads(student))


def test_chunked_loss_is_accurate_on_a_large_vocabulary() -> None:
    """Over SmolLM2's 49,152 tokens, with logits of up to about 20, the float32 loss stays
    within 1e-5 of float64 (KL as sum p * (log p - log q), never as a difference of large
    sums, and summed by torch's cascaded sum)."""
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g)
    w, tw = torch.randn(49152, 8, generator=g) * 2, torch.randn(49152, 8, generator=g) * 2
    got = chunked_distillation_loss(x, t, (w, None), (tw, None), 16)
    logp, logq = (t.double() @ tw.double().T).log_softmax(-1), (x.double() @ w.double().T)
    exact = (logp.exp() * (logp - logq.log_softmax(-1))).sum(-1).mean()
    assert got.item() == pytest.approx(exact.item(), rel=1e-5)


def _trainer(student, teacher, windows, **settings) -> Trainer:
    s = HealSettings(steps=3, batch_size=2, seq_len=13, lr=1e-2, warmup=0.0, **settings)
    return Trainer(student, teacher, windows[:4], windows[4:], s)


@pytest.mark.parametrize("lora", [None, 2])
def test_gradient_checkpointing_gives_the_same_gradients(pruned, lora, monkeypatch) -> None:
    """On layers of different widths and a removed layer, in full fine-tuning and LoRA: the
    same gradients, and the same weights after three steps."""
    monkeypatch.setattr(heal_module, "CHUNK_TOKENS", 7)  # 26 tokens a batch: 4 chunks
    teacher, space, windows = pruned
    plain, ckpt = (
        _trainer(space.materialize(JOINT), teacher, windows, lora=lora, gradient_checkpointing=g)
        for g in (False, True)
    )
    ids = windows[:2]
    for t in (plain, ckpt):
        t.loss(ids).backward()
    _close(*(_grads(t.student) for t in (plain, ckpt)), 1e-6)
    for t in (plain, ckpt):
        t.optimizer.zero_grad(set_to_none=True)
        for _ in range(3):
            t.step()
    assert plain.state.losses == pytest.approx(ckpt.state.losses, rel=1e-6)
    _close(*({n: p.detach() for n, p in t.named} for t in (plain, ckpt)), 1e-6)
    # undone when finished: the layers' own forward again
    for layer in ckpt.finished().model.layers:
        assert "forward" not in layer.__dict__


def test_chunked_held_out_equals_the_full_reference(pruned, monkeypatch) -> None:
    """KL and perplexity on held-out windows from the teacher's last hidden states match the
    full-distribution reference (the fitness's Evaluator, as heal used before), and the dense
    perplexity too; 6 windows in batches of 4 (one short batch), in chunks of 7 tokens."""
    monkeypatch.setattr(heal_module, "CHUNK_TOKENS", 7)
    teacher, space, windows = pruned
    student = space.materialize(JOINT)
    old = Evaluator(teacher, windows, lambda c: None, (), 4, hidden_reference=False)
    assert old.top_k is None  # full distributions: exact
    scores = Evaluator(student, windows, lambda c: None, (), 4, reference=old.reference())
    want = scores.score((), 0, len(windows))
    held = HeldOut(Split(teacher, windows[:1, :5]), windows, 4)
    assert held.features[0].shape == (4, 13, teacher.config.hidden_size)  # not the vocabulary
    got = score(student, held)
    assert got["kl"] == pytest.approx(float(want.kl.mean()), rel=1e-5)
    assert got["ppl"] == pytest.approx(float(np.exp(want.nll.mean())), rel=1e-5)
    assert held.dense_nll == pytest.approx(old.dense_scores.nll, rel=1e-5)
    # and both against float64 from whole logits: per token sum p (log p - log q), clamped
    logp = logits(teacher, windows).double().log_softmax(-1)
    logq = logits(student, windows).double().log_softmax(-1)
    exact = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0).mean(1).mean()
    assert got["kl"] == pytest.approx(float(exact), rel=1e-6)
    assert score(teacher, held)["kl"] == pytest.approx(0.0, abs=1e-6)


def test_lora_student_shares_the_dense_weights_and_leaves_them_alone(pruned) -> None:
    """LoRA's frozen student holds the resident model's tensors (no copy), computes what the
    materialised copy does, and merging writes new tensors: the dense model is unchanged."""
    teacher, space, windows = pruned
    dense = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    copied, shared = space.materialize(JOINT), shared_pruned(space, JOINT)
    ids = windows[:2]
    assert torch.allclose(logits(shared, ids), logits(copied, ids), atol=1e-6)
    space.apply(JOINT)  # the resident model points at the candidate's tensors
    owners = {p.untyped_storage().data_ptr() for p in teacher.parameters()}
    space.apply(space.dense())
    assert all(p.untyped_storage().data_ptr() in owners for p in shared.parameters())
    trainer = _trainer(shared, teacher, windows, lora=2)
    for _ in range(3):
        trainer.step()
    healed = trainer.finished()
    assert not torch.allclose(logits(healed, ids), logits(copied, ids), atol=1e-4)  # trained
    assert all(torch.equal(p, dense[n]) for n, p in teacher.named_parameters())
    for p in healed.parameters():  # compact, as save_pruned and the exports expect
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()


def test_no_batch_of_logits_is_kept_for_backward(pruned) -> None:
    """Nothing autograd keeps for the backward pass of a step has the vocabulary as its last
    dimension (a batch's logits or their log-softmax, for the KL, would)."""
    teacher, space, windows = pruned
    trainer = _trainer(space.materialize(JOINT), teacher, windows)
    ids = windows[:4]
    vocab = teacher.config.vocab_size
    shapes: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.loss(ids).backward()
    assert shapes and not [s for s in shapes if s[-1] == vocab]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # the test can fail
        distillation_loss(trainer.student(input_ids=ids).logits, logits(teacher, ids))
    assert (*ids.shape, vocab) in shapes
