"""Healing a pruned model: knowledge distillation from the dense model on calibration text.

The student is the config's pruned model (``space.materialize``: the same model ``export
--format pruned`` writes); the teacher is the dense model it was cut from. The loss is the
per-token KL(teacher || student) of the next-token distributions, the same quantity the search
scores. Teacher memory is bounded by computing its logits on the fly, one batch at a time under
``torch.no_grad`` (no cache of teacher outputs, no activations kept for it): at any time one
batch of teacher logits (batch x seq_len x vocab) exists, beside the student's. The "W^T p"
summary the search's fitness uses would be smaller, but it is exact only while the student's
LM head equals the teacher's, and full fine-tuning trains the head.

Training: AdamW, linear warm-up then cosine decay to zero, gradient-norm clipping, one seed for
the data order and initialisation of LoRA adapters. The model runs in eval mode (no dropout),
so a step depends only on the weights, the optimizer state and the step number, and a resumed
run repeats an uninterrupted one exactly. On CUDA the forward passes run in bfloat16 autocast
over float32 weights; on the CPU everything is float32.

Sparsity configs keep their masks: gradients of pruned weights are zeroed before clipping and
the weights are re-masked after every step, so they stay exactly zero. ``lora=R`` trains
rank-R adapters on every linear layer (peft) and merges them at the end; it is refused for
sparsity configs, whose zeros a merged dense update would fill.

Held-out windows (the last ``validation_windows`` of the text) are never trained on: every
other window is, in a seeded order that is reshuffled each pass over the text.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from searcher import data, models
from searcher.errors import SearcherError
from searcher.fitness import Evaluator
from searcher.heal_settings import HealSettings

HEAL_FILE = "heal.json"
CHECKPOINTS = "checkpoints"
TRAINED = "trained.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"


@dataclass
class HealState:
    """What a checkpoint holds besides the weights and the optimizer."""

    step: int = 0
    losses: list[float] = field(default_factory=list)  # the training loss of every step
    curve: list[dict[str, float]] = field(default_factory=list)  # held-out KL and ppl
    seconds: float = 0.0  # training wall time so far (resumed runs add theirs)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student) of two batches of logits [batch, seq, vocab]."""
    s = student.float().log_softmax(-1).flatten(0, -2)
    t = teacher.float().log_softmax(-1).flatten(0, -2)
    return nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")


def order(n: int, seed: int, step: int, batch: int) -> torch.Tensor:
    """Indices of the training windows of ``step``: passes over all ``n`` windows, each in a
    seeded order of its own (a function of the seed and the step alone, so a resumed run
    draws what an uninterrupted one would)."""
    picked = []
    for i in range(step * batch, (step + 1) * batch):
        epoch, k = divmod(i, n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        picked.append(int(torch.randperm(n, generator=g)[k]))
    return torch.tensor(picked)


class Masks:
    """The zeros of a sparsity config's weights, held fixed through training."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.weights = [model.get_parameter(n) for n in names]
        self.keep = [w.detach() != 0 for w in self.weights]

    def grads(self) -> None:
        for w, keep in zip(self.weights, self.keep):
            if w.grad is not None:
                w.grad.mul_(keep)

    def weights_(self) -> None:
        with torch.no_grad():
            for w, keep in zip(self.weights, self.keep):
                w.mul_(keep)


class Trainer:
    """Distillation of ``student`` from ``teacher`` on ``train`` windows, with checkpoints."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        train: torch.Tensor,
        validation: torch.Tensor | None,
        settings: HealSettings,
        masked: Sequence[str] = (),
        frozen_head: bool = False,
    ) -> None:
        """``masked``: names of weights whose zeros stay (a sparsity config's).
        ``validation``: held-out windows for ``evaluate`` (None: not evaluated here).
        ``frozen_head``: keep the input embeddings and the LM head as they are."""
        self.settings = settings
        self.teacher = teacher.eval()
        self.device = next(teacher.parameters()).device
        self.train = train
        self.validation = validation
        torch.manual_seed(settings.seed)  # LoRA's adapter initialisation
        student = student.float().to(self.device).eval()
        self.masks = Masks(student, masked) if masked else None
        self.student = self._trainable(student, frozen_head)
        self.params = [p for _, p in self.named]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=settings.learning_rate, weight_decay=settings.weight_decay
        )
        # the teacher's full next-token distributions on the held-out windows (the student's
        # head changes in training, so the fitness's W^T p summary would not be exact)
        self.reference = None
        if validation is not None:
            self.reference = Evaluator(
                teacher, validation, lambda c: None, (), settings.batch_size,
                hidden_reference=False,
            ).reference()  # fmt: skip
        self.state = HealState()

    def _trainable(self, model: nn.Module, frozen_head: bool) -> nn.Module:
        if self.settings.lora is None:
            model.requires_grad_(True)
            if frozen_head:
                model.get_input_embeddings().requires_grad_(False)
                model.get_output_embeddings().requires_grad_(False)
        else:
            from peft import LoraConfig, get_peft_model

            model.requires_grad_(False)
            r = self.settings.lora
            lora = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear")
            model = get_peft_model(model, lora)
            model.eval()
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return model

    def autocast(self):
        on_cuda = self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on_cuda)

    def step(self) -> float:
        """One optimizer step on the next batch; its distillation loss."""
        s = self.settings
        ids = self.train[order(len(self.train), s.seed, self.state.step, s.batch_size)]
        ids = ids.to(self.device)
        with torch.no_grad(), self.autocast():
            target = self.teacher(input_ids=ids, use_cache=False).logits
        with self.autocast():
            logits = self.student(input_ids=ids, use_cache=False).logits
        loss = distillation_loss(logits, target)
        del target
        loss.backward()
        del logits
        if self.masks is not None:
            self.masks.grads()
        nn.utils.clip_grad_norm_(self.params, s.clip)
        for group in self.optimizer.param_groups:
            group["lr"] = s.rate(self.state.step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.masks is not None:
            self.masks.weights_()
        self.state.step += 1
        value = float(loss.detach())
        self.state.losses.append(value)
        return value

    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Held-out KL to the teacher and perplexity of the student (or ``model``)."""
        if self.validation is None:
            raise ValueError("this trainer was given no held-out windows")
        return score(model or self.student, self.validation, self.reference, self.settings)

    def save(self, root: Path) -> Path:
        """A checkpoint of this step, written whole before the previous one is removed (a
        kill at any point leaves one complete checkpoint)."""
        from safetensors.torch import save_file

        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.state.step:08d}"
        tmp = root / f".{final.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({n: p.detach().contiguous() for n, p in self.named}, tmp / TRAINED)
        torch.save(self.optimizer.state_dict(), tmp / OPTIMIZER)
        state = {"settings": asdict(self.settings), **asdict(self.state)}
        (tmp / STATE).write_text(json.dumps(state), encoding="utf-8")
        os.replace(tmp, final)
        for old in root.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, checkpoint: Path) -> None:
        from safetensors.torch import load_file

        saved = json.loads((checkpoint / STATE).read_text(encoding="utf-8"))
        settings = saved.pop("settings")
        if settings != asdict(self.settings):
            differ = sorted(k for k in settings if settings[k] != asdict(self.settings).get(k))
            raise SearcherError(
                f"{checkpoint} was written with other settings ({', '.join(differ)}): resume "
                "with the flags it was started with, or heal into another --out"
            )
        tensors = load_file(checkpoint / TRAINED, device=str(self.device))
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(tensors[n])
        self.optimizer.load_state_dict(
            torch.load(checkpoint / OPTIMIZER, map_location=self.device, weights_only=True)
        )
        self.state = HealState(**saved)

    def finished(self) -> nn.Module:
        """The healed model as a plain transformers model (LoRA adapters merged)."""
        model = self.student
        if self.settings.lora is not None:
            model = model.merge_and_unload()
        return model.requires_grad_(False).eval()


def score(
    model: nn.Module, windows: torch.Tensor, reference: Any, settings: HealSettings
) -> dict[str, float]:
    """KL to the dense reference and perplexity of ``model`` on ``windows``."""
    ev = Evaluator(model, windows, lambda c: None, (), settings.batch_size, reference=reference)
    s = ev.score((), 0, ev.n_windows)
    return {"kl": float(s.kl.mean()), "ppl": math.exp(float(s.nll.mean()))}


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / CHECKPOINTS).glob("step-*"))
    return found[-1] if found else None


def config_of(source: str, pick: str | None) -> dict[str, Any]:
    """The config to heal: a run directory's (``pick`` best or a front index) or a config
    file's (``pick`` an index into pareto.json)."""
    from searcher.export import choose
    from searcher.run import read_config

    if Path(source).is_dir():
        return choose(source, pick or "best")
    if pick in (None, "best"):
        return read_config(source, None)
    try:
        return read_config(source, int(pick))
    except ValueError:
        raise SearcherError(f"--pick {pick!r}: give best or an index into pareto.json") from None


def heal(
    source: str,
    out: str | Path,
    settings: HealSettings = HealSettings(),  # noqa: B008 (frozen)
    pick: str | None = None,
    model: str | None = None,
    resume: bool = False,
    trust_remote_code: bool = False,
    on_phase: Callable[[str], None] = lambda text: None,
    on_step: Callable[[HealState], None] = lambda state: None,
) -> dict[str, Any]:
    """``searcher heal SOURCE --out OUT``: distil the config's pruned model from the dense
    model and write it as a pruned export (``export.pruned``) plus ``heal.json``."""
    from searcher.export import _refuse_overwrite, canonical, load_pruned
    from searcher.export.pruned import save_pruned
    from searcher.run import session_of_config

    settings.check()
    out = Path(out)
    config = config_of(source, pick)
    if settings.lora is not None and config["space"]["name"] == "sparsity":
        raise SearcherError(
            "--lora cannot heal a sparsity config: merging the dense low-rank update would fill "
            "the pruned weights; heal it with full fine-tuning (drop --lora)"
        )
    _refuse_overwrite(config, Path(source), out, model)
    checkpoint = latest_checkpoint(out)
    if resume and checkpoint is None:
        raise SearcherError(f"--resume: {out} holds no heal checkpoint to continue from")
    if not resume and (checkpoint is not None or (out / HEAL_FILE).exists()):
        raise SearcherError(
            f"{out} holds an earlier heal: continue it with --resume, or pick another --out"
        )
    models.check_device(settings.device)
    t0 = time.perf_counter()
    on_phase("rebuilding the pruned model and the dense teacher")
    # rebuilt on the CPU, as export does (the units a config names are chosen from activation
    # statistics, which another device rounds differently), then moved to --device
    session, genes = session_of_config(
        source, config, model, "cpu", None, settings.batch_size, trust_remote_code
    )
    space = session.space
    student = space.materialize(genes)
    masked = space.weight_names() if space.name == "sparsity" else []
    text = data.read_text(settings.data or config["data"]["source"])
    win = data.held_out(
        session.loaded.tokenizer, text, settings.seq_len, settings.validation_windows
    )
    teacher = session.loaded.model.to(settings.device)  # dense again after materialize
    trainer = Trainer(student, teacher, win.calibration, win.validation, settings, masked)
    on_phase("scoring the unhealed model on the held-out windows")
    before = trainer.evaluate()
    if checkpoint is not None:
        on_phase(f"resuming from {checkpoint.name}")
        trainer.load(checkpoint)
    elif settings.evaluated(0):
        trainer.state.curve.append({"step": 0, **before, "loss": None})
    on_phase("healing")
    while trainer.state.step < settings.steps:
        t = time.perf_counter()
        loss = trainer.step()
        trainer.state.seconds += time.perf_counter() - t  # training alone, not the curve
        n = trainer.state.step
        if settings.evaluated(n):
            trainer.state.curve.append({"step": n, **trainer.evaluate(), "loss": loss})
        if n % settings.checkpoint_every == 0 and n < settings.steps:
            trainer.save(out / CHECKPOINTS)
        on_step(trainer.state)
    on_phase("writing the healed model")
    dtype = getattr(torch, config.get("dtype", "float32"))  # the run's, as export writes
    healed = trainer.finished().to("cpu").to(dtype)
    after = score(healed, win.validation, trainer.reference, settings)
    info = _summary(settings, trainer, before, after, win, time.perf_counter() - t0)
    if trainer.masks is not None:  # checked, not assumed: the pruned weights not zero
        info["pruned_weights_nonzero"] = sum(
            int(healed.get_parameter(n)[~keep.cpu()].count_nonzero())
            for n, keep in zip(masked, trainer.masks.keep)
        )
    header = {**canonical(config), "heal": info}
    written = save_pruned(healed, out, header)
    session.loaded.tokenizer.save_pretrained(out)
    reloaded = score(load_pruned(out, dtype), win.validation, trainer.reference, settings)
    if not math.isclose(reloaded["kl"], after["kl"], rel_tol=1e-4, abs_tol=1e-6):
        raise SearcherError(
            f"the saved healed model's held-out KL {reloaded['kl']:.6f} differs from the trained "
            f"one's {after['kl']:.6f}: the export is not faithful (please report this)"
        )
    result = {"out": str(out), **info, "remote_code": written["remote_code"]}
    (out / HEAL_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    return result


def _summary(
    settings: HealSettings, trainer: Trainer, before: dict[str, float], after: dict[str, float],
    win: data.Windows, wall: float,
) -> dict[str, Any]:  # fmt: skip
    """heal.json's figures."""
    dense_ppl = math.exp(float(trainer.reference.dense_nll.mean()))
    tokens = settings.steps * settings.batch_size * settings.seq_len
    trained = sum(p.numel() for p in trainer.params)
    memory: dict[str, Any] = {"peak_rss_mib": peak_rss_mib()}
    if trainer.device.type == "cuda":
        memory["peak_cuda_mib"] = torch.cuda.max_memory_allocated(trainer.device) / 2**20
    return {
        "settings": {**asdict(settings), "lr": settings.learning_rate},
        "mode": "full" if settings.lora is None else f"lora r={settings.lora}",
        "trained_parameters": trained,
        "precision": "bfloat16 autocast" if trainer.device.type == "cuda" else "float32",
        "data": {
            **win.spec,
            "training_windows": len(win.calibration),
            "held_out_windows": len(win.validation),
            "split": "held out = the last windows of the text; trained on all the others",
        },
        "before": before,
        "after": after,
        "dense_ppl": dense_ppl,
        "kl_ratio": after["kl"] / before["kl"] if before["kl"] > 0 else None,
        "steps": settings.steps,
        "tokens": tokens,
        "train_seconds": trainer.state.seconds,
        "tokens_per_second": tokens / trainer.state.seconds if trainer.state.seconds else None,
        "wall_seconds": wall,
        "memory": memory,
        "curve": trainer.state.curve,
        "losses": trainer.state.losses,
    }


def peak_rss_mib() -> float:
    """The process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
