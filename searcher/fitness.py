"""Scoring candidates: KL divergence from the dense model's next-token distribution.

Per token, with p the dense and q the candidate distribution and z the candidate's logits:
KL(p || q) = sum p log p - sum p z + logsumexp(z), which needs no log-softmax tensor.

When the logits are the LM head applied to the last hidden state h (z = W h + b, as in the
Llama family), sum p z = h . (W^T p) + b . p, so the dense reference is kept as one
hidden-sized vector u = W^T p per token (plus the scalars sum p log p and b . p): exact KL
at hidden/vocab of the memory of full probabilities, and no vocabulary-sized read of them
per candidate. The only vocabulary-sized work left per candidate is the LM head (which a
bare forward pass does too) and one logsumexp; ``batch_size`` windows of logits exist at once.

Models whose logits are post-processed (soft-capping, scaling) keep full probabilities when
they fit in ``reference_bytes``, else the top-k probabilities plus the remaining tail mass
(as EvoPress does); KL is then that of the (k+1)-bucket distributions, a lower bound.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass
class WindowScores:
    """Mean KL and mean next-token NLL (log perplexity) of each window."""

    kl: np.ndarray
    nll: np.ndarray


@dataclass
class DenseReference:
    """The dense model's per-window summaries: computed once, shipped to every worker."""

    summaries: list[dict[str, torch.Tensor]]
    split_head: bool
    top_k: int | None
    dense_nll: np.ndarray

    def to(self, device: torch.device | str) -> DenseReference:
        moved = [{k: v.to(device) for k, v in s.items()} for s in self.summaries]
        return DenseReference(moved, self.split_head, self.top_k, self.dense_nll)


class Evaluator:
    """Scores the resident model, in whatever configuration a space put it, on fixed windows.

    ``reference`` (from another evaluator's ``reference()`` on the same windows) skips the
    dense pass: workers get it from the driver instead of recomputing it.
    """

    def __init__(
        self,
        model: nn.Module,
        windows: torch.Tensor,
        apply: Callable[[Sequence[int]], None],
        dense: Sequence[int],
        batch_size: int = 4,
        reference_bytes: int = 2 << 30,
        top_k: int = 1024,
        hidden_reference: bool = True,
        reference: DenseReference | None = None,
    ) -> None:
        self.model = model
        self.apply = apply
        self.device = next(model.parameters()).device
        self.windows = windows.to(self.device)
        self.batch_size = batch_size
        self.head = model.get_output_embeddings()
        # float32 LM head: logits, logsumexp and the W^T p reference must share one precision,
        # or a bfloat16 model's rounding shows up as KL of the dense model to itself
        self.float_head = FloatHead(self.head)
        vocab = self.head.weight.shape[0]
        apply(dense)
        if reference is not None:
            if len(reference.summaries) != len(self.windows):
                raise ValueError("the reference was computed on other windows")
            ref = reference.to(self.device)
            self.split_head, self.top_k, self._reference = ref.split_head, ref.top_k, ref.summaries
            self.dense_scores = WindowScores(np.zeros(len(self.windows)), ref.dense_nll)
            return
        self.split_head = hidden_reference and self._head_is_last_step()
        full = self.split_head or windows.numel() * vocab * 4 <= reference_bytes
        self.top_k = None if full else min(top_k, vocab)
        self._reference: list[dict[str, torch.Tensor]] = []  # one summary per window
        dense_nll = []
        for start in range(0, len(self.windows), batch_size):
            ids = self.windows[start : start + batch_size]
            hidden, logits = self._outputs(ids)
            with torch.inference_mode():
                for w, z in enumerate(logits):
                    h = None if hidden is None else hidden[w]
                    self._reference.append(self._summarise(h, z))
                    dense_nll.append(_nll(z, ids[w], _logsumexp(z)))
        # the dense model's own scores (KL 0 by definition; NLL gives the dense perplexity)
        self.dense_scores = WindowScores(
            np.zeros(len(self.windows)), torch.stack(dense_nll).double().cpu().numpy()
        )

    def reference(self) -> DenseReference:
        """The dense summaries, on the CPU, for another evaluator of the same windows."""
        return DenseReference(
            self._reference, self.split_head, self.top_k, self.dense_scores.nll
        ).to("cpu")

    @property
    def n_windows(self) -> int:
        return len(self.windows)

    def _head_is_last_step(self) -> bool:
        """Whether logits are just LM head(last hidden state), as in the Llama family; models
        that post-process logits (soft-capping, scaling) are scored from full logits."""
        ids = self.windows[:1, : min(16, self.windows.shape[1])]
        with torch.inference_mode():
            full = self.model(input_ids=ids, use_cache=False).logits.float()
            hidden = self.model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
            split = self.head(hidden).float()
        return bool(torch.allclose(full, split, rtol=1e-4, atol=1e-4))

    def _outputs(self, ids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Last hidden states (when the reference uses them) and float logits of a batch."""
        with torch.inference_mode():
            if not self.split_head:
                return None, self.model(input_ids=ids, use_cache=False).logits.float()
            hidden = self.model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
            hidden = hidden.float()
            return hidden, self.float_head.logits(hidden)

    def _summarise(self, h: torch.Tensor | None, z: torch.Tensor) -> dict[str, torch.Tensor]:
        logp = torch.log_softmax(z, dim=-1)
        if h is not None:
            p = logp.exp()
            ref = {"u": self.float_head.project(p), "neg_entropy": (p * logp).sum(-1)}
            if self.float_head.bias is not None:
                ref["pb"] = p @ self.float_head.bias
            return ref
        if self.top_k is None:
            p = logp.exp()
            return {"p": p, "neg_entropy": (p * logp).sum(-1)}
        top, idx = logp.topk(self.top_k, dim=-1)
        pk = top.exp()
        tail = (1.0 - pk.sum(-1)).clamp_min(1e-12)
        neg_entropy = (pk * top).sum(-1) + tail * tail.log()
        return {"p": pk, "idx": idx, "tail": tail, "neg_entropy": neg_entropy}

    def _kl(self, ref: dict[str, torch.Tensor], h: Any, z: torch.Tensor, lse: torch.Tensor):
        """Per-token KL(dense || candidate) of one window."""
        if h is not None:
            cross = (h * ref["u"]).sum(-1) + ref.get("pb", 0.0)
        elif self.top_k is None:
            cross = torch.einsum("tv,tv->t", ref["p"], z)
        else:
            logq = z.gather(-1, ref["idx"]) - lse[:, None]
            q_tail = (1.0 - logq.exp().sum(-1)).clamp_min(1e-12)
            cross = (ref["p"] * logq).sum(-1) + ref["tail"] * q_tail.log() + lse
        return ref["neg_entropy"] - (cross - lse)

    def score(self, candidate: Sequence[int], start: int, stop: int) -> WindowScores:
        """Per-window KL and NLL of the candidate on windows [start, stop)."""
        self.apply(candidate)
        kl, nll = [], []
        for b0 in range(start, stop, self.batch_size):
            ids = self.windows[b0 : min(b0 + self.batch_size, stop)]
            hidden, logits = self._outputs(ids)
            with torch.inference_mode():
                for w, z in enumerate(logits):
                    lse = _logsumexp(z)
                    h = None if hidden is None else hidden[w]
                    kl.append(self._kl(self._reference[b0 + w], h, z, lse).clamp_min(0).mean())
                    nll.append(_nll(z, ids[w], lse))
        # a numerically broken candidate (NaN, e.g. float16 overflow) must rank last
        return WindowScores(
            torch.stack(kl).double().nan_to_num(nan=float("inf")).cpu().numpy(),
            torch.stack(nll).double().nan_to_num(nan=float("inf")).cpu().numpy(),
        )


class FloatHead:
    """The LM head in float32 without a float32 copy of a lower-precision head: a block of
    ``rows`` vocabulary rows is cast at a time (for a bfloat16 Llama-3-8B a whole copy is
    2.1 GB, per evaluator). A float32 head is used as it is, in one piece."""

    def __init__(self, head: nn.Module, rows: int = 4096) -> None:
        self.weight = head.weight.detach()
        self.bias = None if head.bias is None else head.bias.detach().float()
        whole = self.weight.dtype == torch.float32
        self.rows = self.weight.shape[0] if whole else rows

    def _blocks(self):
        for r0 in range(0, self.weight.shape[0], self.rows):
            yield slice(r0, r0 + self.rows), self.weight[r0 : r0 + self.rows].float()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 ``hidden @ W^T + b``."""
        if self.rows >= self.weight.shape[0]:
            return nn.functional.linear(hidden, self.weight.float(), self.bias)
        out = hidden.new_empty((*hidden.shape[:-1], self.weight.shape[0]))
        for rows, w in self._blocks():
            b = None if self.bias is None else self.bias[rows]
            out[..., rows] = nn.functional.linear(hidden, w, b)
        return out

    def project(self, p: torch.Tensor) -> torch.Tensor:
        """float32 ``p @ W`` (probabilities over the vocabulary to the hidden size)."""
        out = None
        for rows, w in self._blocks():
            part = p[..., rows] @ w
            out = part if out is None else out.add_(part)
        return out


def _nll(z: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of one window; its last position has no target."""
    return (lse[:-1] - z[:-1].gather(-1, ids[1:, None]).squeeze(-1)).mean()


def _logsumexp(z: torch.Tensor, rows: int = 16) -> torch.Tensor:
    """logsumexp over the last dim, a few rows at a time: the temporaries stay in cache,
    which is about twice as fast on CPU as one call over many rows."""
    return torch.cat([torch.logsumexp(z[i : i + rows], dim=-1) for i in range(0, len(z), rows)])
