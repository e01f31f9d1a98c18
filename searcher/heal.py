"""Healing a pruned model: knowledge distillation from the dense model on calibration text.

The student is the config's pruned model (``space.materialize``: the same model ``export
--format pruned`` writes); the teacher is the dense model it was cut from. The loss is the
per-token KL(teacher || student) of the next-token distributions, the same quantity the search
scores. The teacher runs on the fly, one batch at a time under ``torch.no_grad`` (no cache of
teacher outputs, no activations kept for it). The "W^T p" summary the search's fitness uses
would be smaller, but it is exact only while the student's LM head equals the teacher's, and
full fine-tuning trains the head.

Memory: neither model's logits ever exist for a whole batch. Both run to their last hidden
state; the LM heads, log-softmaxes and KL then run over ``CHUNK_TOKENS`` tokens at a time
(``chunked_distillation_loss``), and the gradient of each chunk's student logits is taken on
the spot (``softmax(z) - p`` per token), so no chunk's logits outlive it. The held-out
reference is the teacher's last hidden state on the held-out windows (``HeldOut``), not its
full distributions: its LM head remakes its logits a chunk at a time. Models whose logits are
more than their LM head applied to the last hidden state (soft-capping, scaling) fall back to
logits as the "hidden state" and no head: exact, without the saving. Gradient checkpointing
(``checkpoint_layers``, opt-in) recomputes each decoder layer in the backward pass instead of
keeping its activations. LoRA's frozen student shares the dense model's tensors instead of
copying them (``shared_pruned``). AdamW is fused (no temporaries the size of the weights).
The heap's free pages go back to the system after every step (``searcher.heap.release_free``),
and with checkpointing blocks from 1 MB up are mapped apart from it while training
(``CHECKPOINTED_THRESHOLD``). After
training the dense model is let go (the held-out reference keeps only its LM head) before
the healed model is made whole and the saved one is loaded back to check it.

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

import copy
import functools
import json
import math
import os
import resource
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from searcher import data, models
from searcher.errors import SearcherError
from searcher.families import family_of
from searcher.fitness import head_is_last
from searcher.heal_settings import HealSettings
from searcher.heap import THRESHOLD, release_free, return_large_buffers

if TYPE_CHECKING:
    from spaces import SearchSpace

HEAL_FILE = "heal.json"
CHECKPOINTS = "checkpoints"
TRAINED = "trained.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"
# tokens per chunk of the LM heads and the KL: three float32 buffers of chunk x vocab exist at
# a time (25 MB each for a 49,152-token vocabulary). Smaller chunks cost time on the CPU: each
# matmul with the head reads the whole head, so 42 tokens took twice as long as 128 there.
CHUNK_TOKENS = 128
# glibc's mmap threshold while training with gradient checkpointing: a layer's activations
# (blocks of 1-10 MB) then go back to the system when freed instead of piling up in the heap
# beside the inputs each layer keeps (searcher.heap). A 3-step LoRA r=16 heal of SmolLM2 with
# checkpointing (4x256 tokens a step) peaked at 1846 MiB with the default 16 MB, 1420 MiB with
# 1 MB, for 8.3-8.9 s a step against 6.7-7.4 s: the memory option pays in page faults
CHECKPOINTED_THRESHOLD = 1 << 20
# settings that change how memory is spent, not the results: a resume may change them
NEUTRAL_SETTINGS = ("gradient_checkpointing",)


@dataclass
class HealState:
    """What a checkpoint holds besides the weights and the optimizer."""

    step: int = 0
    losses: list[float] = field(default_factory=list)  # the training loss of every step
    curve: list[dict[str, float]] = field(default_factory=list)  # held-out KL and ppl
    seconds: float = 0.0  # training wall time so far (resumed runs add theirs)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student) of two batches of logits [batch, seq, vocab]
    (whole: the reference ``chunked_distillation_loss`` is checked against)."""
    s = student.float().log_softmax(-1).flatten(0, -2)
    t = teacher.float().log_softmax(-1).flatten(0, -2)
    return nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")


Head = tuple[torch.Tensor | None, torch.Tensor | None]  # an LM head's (weight, bias)


class Split:
    """A causal LM as features -> logits. Where its logits are its LM head applied to its last
    hidden state (the Llama family), the features are that hidden state and ``weight``/``bias``
    the head's, so logits can be made a chunk of tokens at a time; for a model that post-
    processes its logits (soft-capping, scaling) the features are the logits themselves and
    there is no head (exact, but a batch's logits exist whole)."""

    def __init__(self, model: nn.Module, probe: torch.Tensor) -> None:
        """``probe``: a few tokens to check the split on (before LoRA wraps ``model``)."""
        self.model = model
        head = model.get_output_embeddings()
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        if isinstance(head, nn.Linear) and head_is_last(model, head, probe):
            self.weight, self.bias = head.weight, head.bias  # the parameters: trained in place

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        """The features of a batch of windows [batch, seq, hidden or vocab]."""
        if self.weight is None:
            return self.model(input_ids=ids, use_cache=False).logits
        return self.model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """float32 logits of a chunk of features."""
        return _logits(features, self.weight, self.bias)

    @property
    def head(self) -> Head:
        return self.weight, self.bias


def _logits(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None):
    return (x if weight is None else nn.functional.linear(x, weight, bias)).float()


def chunked_distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_head: Head = (None, None),
    teacher_head: Head = (None, None),
    chunk: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """``distillation_loss`` of the logits ``head(features)`` of student and teacher, ``chunk``
    tokens at a time. ``student`` and ``teacher``: features [tokens, dim] (``Split``);
    a head is (weight, bias), (None, None) where the features are logits.

    The gradients (of the student's features, and of its head where that is trained) are made
    in the forward pass, chunk by chunk, and handed out in the backward pass: no chunk's
    logits are kept, and nothing is computed twice."""
    w, b = student_head
    tw, tb = teacher_head
    return _ChunkedKL.apply(student, w, b, teacher.detach(), tw, tb, chunk)


class _ChunkedKL(torch.autograd.Function):
    """Mean per-token KL(p || q), q = softmax(head(x)), p = softmax(teacher head(t)); its
    gradient per token w.r.t. the student's logits is (q * sum(p) - p) / tokens (what autograd
    gives for log_softmax then kl_div: sum(p) is 1 up to rounding)."""

    @staticmethod
    def forward(ctx, x, weight, bias, t, t_weight, t_bias, chunk):  # noqa: ANN001, ANN205
        n = x.shape[0]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = torch.empty_like(x) if need_x else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_w else None
        gb = torch.zeros(bias.shape, dtype=torch.float32, device=x.device) if need_b else None
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        for i in range(0, n, chunk):
            xs = x[i : i + chunk]
            logq = _logits(xs, weight, bias).log_softmax(-1)
            logp = _logits(t[i : i + chunk], t_weight, t_bias).log_softmax(-1)
            p = logp.exp()
            # in place, then torch's sum (cascaded: exact to float32 rounding over the whole
            # vocabulary; a dot product's running sum drifted 1e-4 on SmolLM2's 49,152)
            total += logp.sub_(logq).mul_(p).sum().double()
            del logp
            if gx is None and gw is None and gb is None:
                continue
            g = logq.exp_().mul_(p.sum(-1, keepdim=True)).sub_(p).div_(n)  # in logq's buffer
            del p
            # float32, whatever autocast does to the logits above (gw accumulates in place)
            with torch.autocast(x.device.type, enabled=False):
                if gx is not None:
                    gx[i : i + chunk] = g if weight is None else g @ weight.float()
                if gw is not None:
                    gw.addmm_(g.t(), xs.float())
            if gb is not None:
                gb.add_(g.sum(0))
        # tensors made here, neither inputs nor outputs: kept on ctx as they are
        ctx.grads = (gx, gw, gb)
        ctx.dtypes = (x.dtype, None if weight is None else weight.dtype,
                      None if bias is None else bias.dtype)  # fmt: skip
        return (total / n).float()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        out = [None if g is None else g.mul_(grad).to(d) for g, d in zip(ctx.grads, ctx.dtypes)]
        ctx.grads = None
        return (*out, None, None, None, None)


def checkpoint_layers(model: nn.Module) -> nn.ModuleList:
    """Gradient checkpointing of ``model``'s decoder layers: each keeps only its input for the
    backward pass and runs again there. Works in eval mode (transformers' own switch checks
    ``training``), on layers of different shapes and on layers whose blocks were removed
    (it wraps the layer whole). Undone by ``uncheckpoint_layers``."""
    layers = family_of(model).decoder_layers(model)
    for layer in layers:
        # an instance attribute over the class's forward: hooks, names and weights unchanged
        layer.forward = functools.partial(_recomputed, layer.forward)
    return layers


def uncheckpoint_layers(model: nn.Module) -> None:
    for layer in family_of(model).decoder_layers(model):
        layer.__dict__.pop("forward", None)


def _recomputed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def shared_pruned(space: SearchSpace, genes: Sequence[int]) -> nn.Module:
    """The config's pruned model as ``space.materialize`` makes it, but holding the resident
    model's own tensors (views, where a space slices them) instead of copies: for a student
    whose weights are frozen (LoRA). Its modules are its own; its parameters are new
    ``Parameter`` objects over the same memory, so nothing must write them in place (peft's
    ``safe_merge`` copies). Not for the sparsity space, which writes its weights in place."""
    if space.name == "sparsity":
        raise ValueError("the sparsity space writes its weights in place: materialize instead")
    model = space.structure.model
    space.apply(genes)
    try:
        shared = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in model.parameters()}
        pruned = copy.deepcopy(model, shared)
    finally:
        space.apply(space.dense())
    return pruned


def compact(model: nn.Module) -> nn.Module:
    """Every parameter that is a slice of a larger tensor replaced by a copy of its own."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.untyped_storage().nbytes() > p.numel() * p.element_size():
                setattr(module, name, nn.Parameter(p.detach().clone(), p.requires_grad))
    return model


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


class HeldOut:
    """The teacher on held-out windows, reduced to what KL to it needs: its features (``Split``:
    the last hidden state, hidden/vocab of its full distributions) and its LM head, which
    remakes its logits a chunk of tokens at a time when a model is scored; and its perplexity.
    It keeps no reference to the teacher model but its head."""

    def __init__(self, teacher: Split, windows: torch.Tensor, batch_size: int) -> None:
        self.windows = windows
        self.batch_size = batch_size
        self.head = teacher.head
        self.features: list[torch.Tensor] = []
        nll = []
        with torch.inference_mode():
            for ids in self.batches():
                f = teacher.features(ids)
                self.features.append(f)
                nll.append(self._per_window(ids, f, teacher.head, None)[1])
        self.dense_nll = torch.cat(nll).double().cpu().numpy()

    @property
    def device(self) -> torch.device:
        return self.windows.device

    def batches(self) -> Iterator[torch.Tensor]:
        for b0 in range(0, len(self.windows), self.batch_size):
            yield self.windows[b0 : b0 + self.batch_size]

    def score(self, model: Split) -> dict[str, float]:
        """Held-out KL to the teacher (mean over windows of each window's mean over tokens)
        and perplexity of ``model`` (on this reference's device)."""
        kl, nll = [], []
        with torch.inference_mode():
            for ids, teacher in zip(self.batches(), self.features):
                k, n = self._per_window(ids, model.features(ids), model.head, teacher)
                kl.append(k)
                nll.append(n)
        kls = torch.cat(kl).double().nan_to_num(nan=float("inf"))
        nlls = torch.cat(nll).double().nan_to_num(nan=float("inf"))
        return {"kl": float(kls.mean()), "ppl": math.exp(float(nlls.mean()))}

    def _per_window(
        self, ids: torch.Tensor, feats: torch.Tensor, head: Head, teacher: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per window: mean KL to the teacher (each token's clamped at 0, as the search's
        fitness does; zeros without ``teacher``) and mean next-token NLL (the last position
        has no target)."""
        b, t = ids.shape
        x = feats.flatten(0, 1)
        target = torch.cat([ids[:, 1:], ids[:, :1]], 1).flatten()  # last column: unused
        kl, nll = torch.zeros(b * t, device=x.device), torch.empty(b * t, device=x.device)
        tf = None if teacher is None else teacher.flatten(0, 1)
        chunk = CHUNK_TOKENS
        for i in range(0, b * t, chunk):
            z = _logits(x[i : i + chunk], *head)
            lse = torch.logsumexp(z, -1)
            nll[i : i + chunk] = lse - z.gather(-1, target[i : i + chunk, None]).squeeze(-1)
            if tf is not None:
                logp = _logits(tf[i : i + chunk], *self.head).log_softmax(-1)
                logq = z.sub_(lse[:, None])
                p = logp.exp()
                kl[i : i + chunk] = logp.sub_(logq).mul_(p).sum(-1)  # (see _ChunkedKL)
        return kl.clamp_min(0).view(b, t).mean(1), nll.view(b, t)[:, :-1].mean(1)


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
        probe = (train if len(train) else validation)[:1, :16].to(self.device)
        self.teacher_split = Split(self.teacher, probe)
        self.split = Split(student, probe)  # before LoRA: peft wraps the same modules
        self.student = self._trainable(student, frozen_head)
        if settings.gradient_checkpointing:
            checkpoint_layers(student)
        self.params = [p for _, p in self.named]
        # fused: the update in one kernel per tensor; the default (foreach) makes temporaries
        # the size of all trained weights at every step
        self.optimizer = torch.optim.AdamW(
            self.params, lr=settings.learning_rate, weight_decay=settings.weight_decay,
            fused=True,
        )  # fmt: skip
        # the teacher's last hidden states on the held-out windows (the student's head changes
        # in training, so the fitness's W^T p summary would not be exact; its head remakes
        # its distributions a chunk at a time)
        self.held_out = None
        if validation is not None:
            windows = validation.to(self.device)
            self.held_out = HeldOut(self.teacher_split, windows, settings.batch_size)
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
            with warnings.catch_warnings():
                # peft reads transformers' deprecated ``is_gradient_checkpointing``: a
                # FutureWarning on every LoRA heal that no user can act on
                warnings.filterwarnings(
                    "ignore", ".*is_gradient_checkpointing", category=FutureWarning
                )
                model = get_peft_model(model, lora)
            model.eval()
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return model

    def autocast(self):
        on_cuda = self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on_cuda)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """The distillation loss of a batch of windows, ready for ``backward``."""
        with torch.no_grad(), self.autocast():
            target = self.teacher_split.features(ids)
        with self.autocast():
            features = self.split.features(ids)
            return chunked_distillation_loss(
                features.flatten(0, -2), target.flatten(0, -2), self.split.head,
                self.teacher_split.head, CHUNK_TOKENS,
            )  # fmt: skip

    def step(self) -> float:
        """One optimizer step on the next batch; its distillation loss."""
        s = self.settings
        ids = self.train[order(len(self.train), s.seed, self.state.step, s.batch_size)]
        loss = self.loss(ids.to(self.device))
        loss.backward()
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
        if self.held_out is None:
            raise ValueError("this trainer was given no held-out windows")
        if model is None:
            return self.held_out.score(self.split)
        return score(model, self.held_out)

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
        ours = asdict(self.settings)
        differ = sorted(
            k for k in {*settings, *ours}
            if k not in NEUTRAL_SETTINGS and settings.get(k) != ours.get(k)
        )  # fmt: skip
        if differ:
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
        """The healed model as a plain transformers model (LoRA adapters merged), with weights
        of its own. Training ends here: the optimizer's state is let go."""
        self.optimizer.state.clear()
        model = self.student
        if self.settings.gradient_checkpointing:
            uncheckpoint_layers(self.split.model)
        if self.settings.lora is not None:
            # safe_merge: a merged weight is a new tensor, never written into the frozen one
            # (which may be the teacher's own, shared_pruned)
            model = compact(model.merge_and_unload(safe_merge=True))
        return model.requires_grad_(False).eval()


def score(model: nn.Module, reference: HeldOut) -> dict[str, float]:
    """KL to the teacher and perplexity of ``model`` on ``reference``'s held-out windows."""
    probe = reference.windows[:1, :16]
    return reference.score(Split(model, probe))


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
    # statistics, which another device rounds differently), then moved to --device; and in
    # the run's batches, not --batch-size (statistics summed in other batches round
    # differently too: a run at 4 was refused at --batch-size 2)
    session, genes = session_of_config(source, config, model, "cpu", None, None, trust_remote_code)
    space = session.space
    # LoRA's student is frozen: it holds the resident model's tensors, not copies of them
    student = space.materialize(genes) if settings.lora is None else shared_pruned(space, genes)
    masked = space.weight_names() if space.name == "sparsity" else []
    tokenizer = session.loaded.tokenizer
    text = data.read_text(settings.data or config["data"]["source"])
    win = data.held_out(tokenizer, text, settings.seq_len, settings.validation_windows)
    teacher = session.loaded.model.to(settings.device)  # dense again after materialize
    trainer = Trainer(student, teacher, win.calibration, win.validation, settings, masked)
    del student, teacher, space, session  # the trainer's now (let go below)
    on_phase("scoring the unhealed model on the held-out windows")
    before = trainer.evaluate()
    release_free()  # what rebuilding the session freed
    if checkpoint is not None:
        on_phase(f"resuming from {checkpoint.name}")
        trainer.load(checkpoint)
    elif settings.evaluated(0):
        trainer.state.curve.append({"step": 0, **before, "loss": None})
    on_phase("healing")
    if settings.gradient_checkpointing:
        return_large_buffers(CHECKPOINTED_THRESHOLD)
    while trainer.state.step < settings.steps:
        t = time.perf_counter()
        loss = trainer.step()
        trainer.state.seconds += time.perf_counter() - t  # training alone, not the curve
        n = trainer.state.step
        if settings.evaluated(n):
            trainer.state.curve.append({"step": n, **trainer.evaluate(), "loss": loss})
        if n % settings.checkpoint_every == 0 and n < settings.steps:
            trainer.save(out / CHECKPOINTS)
        release_free()  # the step's activations, so that the next step does not add to them
        on_step(trainer.state)
    if settings.gradient_checkpointing:
        return_large_buffers(THRESHOLD)
    on_phase("writing the healed model")
    dtype = getattr(torch, config.get("dtype", "float32"))  # the run's, as export writes
    # from here on, only the held-out reference needs the teacher (its head): the dense
    # model's other weights go before the healed model is made whole (LoRA's merged copies)
    # and the saved one is loaded back, so that neither comes on top of the training peak
    held_out, masks = trainer.held_out, trainer.masks
    trainer.teacher = trainer.teacher_split = None
    healed = trainer.finished().to(dtype)
    after = score(healed, held_out)
    info = _summary(settings, trainer, before, after, win, time.perf_counter() - t0)
    del trainer
    if masks is not None:  # checked, not assumed: the pruned weights not zero
        info["pruned_weights_nonzero"] = sum(
            int(healed.get_parameter(n)[~keep].count_nonzero())
            for n, keep in zip(masked, masks.keep)
        )
        del masks
    header = {**canonical(config), "heal": info}
    written = save_pruned(healed.to("cpu"), out, header)
    tokenizer.save_pretrained(out)
    del healed
    release_free()
    reloaded = score(load_pruned(out, dtype).to(held_out.device), held_out)
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
    dense_ppl = math.exp(float(trainer.held_out.dense_nll.mean()))
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
