"""Scoring candidates: KL divergence from the dense model's next-token distribution.

Per token, with p the dense and q the candidate distribution and z the candidate's logits:
KL(p || q) = sum p log p - sum p z + logsumexp(z), which needs no log-softmax tensor.

When the logits are the LM head applied to the last hidden state h (z = W h + b, as in the
Llama family), sum p z = h . (W^T p) + b . p, so the dense reference is kept as one
hidden-sized vector u = W^T p per token (plus the scalars sum p log p and b . p): exact KL
at hidden/vocab of the memory of full probabilities, and no vocabulary-sized read of them
per candidate. The only vocabulary-sized work left per candidate is the LM head (which a
bare forward pass does too) and one logsumexp.

Scoring is chunked: float32 logits exist for ``chunk_tokens`` tokens at a time (about
``SCORE_BYTES``), never for a whole batch. Everything per token (logsumexp, the target's
logit, KL against the reference) is computed chunk by chunk, and only per-token scalars are
kept until a window's means are taken. A batch of 4 windows of 128 tokens over a 49152-token
vocabulary was 0.1 GB of logits plus their softmax; a chunk is at most 32 MB (here one
window). The decoder still runs on whole batches (hidden states are small beside logits).

Models whose logits are post-processed (soft-capping, scaling) keep full probabilities when
they fit in ``reference_bytes``, else the top-k probabilities plus the remaining tail mass
(as EvoPress does); KL is then that of the (k+1)-bucket distributions, a lower bound.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
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


# float32 logits that exist at once while scoring (one chunk of tokens). Fewer tokens a chunk
# read the LM head more often: SmolLM2's head and logsumexp over 4 x 128 tokens took 36%
# longer in chunks of 64 tokens than in one piece, 11% in chunks of 128 (float32; bfloat16,
# cast a block of rows at a time for each chunk: 44% and 31%); the head is a fifth of its FLOPs
SCORE_BYTES = 32 << 20
ROWS = 16  # tokens per vocabulary-wide reduction (logsumexp, log-softmax): they stay in cache


class Evaluator:
    """Scores the resident model, in whatever configuration a space put it, on fixed windows.

    ``reference`` (from another evaluator's ``reference()`` on the same windows) skips the
    dense pass: workers get it from the driver instead of recomputing it. ``chunk_tokens``:
    tokens whose float32 logits are computed at once (default: ``SCORE_BYTES`` of them); it
    changes memory, not scores.
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
        chunk_tokens: int | None = None,
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
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError("chunk_tokens must be at least 1")
        self.chunk_tokens = chunk_tokens or max(1, SCORE_BYTES // (4 * vocab))
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
            with torch.inference_mode():
                out = self._forward(ids)
                for w in range(len(ids)):
                    parts, lse, target = [], [], []
                    for _, z, z_lse, z_target in self._chunks(out[w], ids[w]):
                        parts.append(self._summarise(z))
                        lse.append(z_lse)
                        target.append(z_target)
                        del z
                    self._reference.append({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
                    dense_nll.append(_nll(torch.cat(lse), torch.cat(target)))
            del out
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
        ids = self.windows[:1, : min(16, self.windows.shape[1])]
        return head_is_last(self.model, self.head, ids)

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        """A batch's float32 last hidden states (when the reference uses them), else its
        logits as the model returns them (cast to float32 a chunk at a time)."""
        if not self.split_head:
            return self.model(input_ids=ids, use_cache=False).logits
        hidden = self.model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        return hidden.float()

    def _chunks(
        self, out: torch.Tensor, ids: torch.Tensor
    ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One window's tokens in chunks of at most ``chunk_tokens``: (their positions, float32
        logits, logsumexp, the logits of the next tokens; the window's last token has none).
        The window is cut into as few chunks as fit, all but the last of one size (16 tokens
        in at most 7: 6, 6, 4, not 7, 7, 2): each chunk reads (and for a half-precision head
        casts) the whole LM head once, so a small last chunk costs nearly as much as a full
        one."""
        n = len(ids)
        size = -(-n // -(-n // self.chunk_tokens))  # n / ceil(n / chunk_tokens), rounded up
        for t0 in range(0, n, size):
            rows = slice(t0, min(t0 + size, n))
            z = self.float_head.logits(out[rows]) if self.split_head else out[rows].float()
            nxt = ids[t0 + 1 : rows.stop + 1]
            yield rows, z, _logsumexp(z), z[: len(nxt)].gather(-1, nxt[:, None]).squeeze(-1)
            del z  # before the next chunk's logits exist

    def _summarise(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """The dense reference of a chunk of tokens, from their float32 logits. Log-softmax
        is taken ``ROWS`` tokens at a time (the same values), so that beside the logits only
        the probabilities exist at chunk size."""
        if self.top_k is not None:
            parts = [
                self._top_k(torch.log_softmax(z[i : i + ROWS], dim=-1))
                for i in range(0, len(z), ROWS)
            ]
            return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
        p, neg_entropy = torch.empty_like(z), z.new_empty(len(z))
        for i in range(0, len(z), ROWS):
            logp = torch.log_softmax(z[i : i + ROWS], dim=-1)
            torch.exp(logp, out=p[i : i + ROWS])
            neg_entropy[i : i + ROWS] = (p[i : i + ROWS] * logp).sum(-1)
        if not self.split_head:
            return {"p": p, "neg_entropy": neg_entropy}
        ref = {"u": self.float_head.project(p), "neg_entropy": neg_entropy}
        if self.float_head.bias is not None:
            ref["pb"] = p @ self.float_head.bias
        return ref

    def _top_k(self, logp: torch.Tensor) -> dict[str, torch.Tensor]:
        """The top-k reference of some tokens from their log-probabilities."""
        top, idx = logp.topk(self.top_k, dim=-1)
        pk = top.exp()
        tail = (1.0 - pk.sum(-1)).clamp_min(1e-12)
        neg_entropy = (pk * top).sum(-1) + tail * tail.log()
        return {"p": pk, "idx": idx, "tail": tail, "neg_entropy": neg_entropy}

    def _kl(self, ref: dict[str, torch.Tensor], h: Any, z: torch.Tensor, lse: torch.Tensor):
        """Per-token KL(dense || candidate) of a chunk of tokens (``ref`` cut to them)."""
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
            with torch.inference_mode():
                out = self._forward(ids)
                for w in range(len(ids)):
                    ref = self._reference[b0 + w]
                    token_kl, lse, target = [], [], []
                    for rows, z, z_lse, z_target in self._chunks(out[w], ids[w]):
                        h = out[w, rows] if self.split_head else None
                        part = {k: v[rows] for k, v in ref.items()}
                        token_kl.append(self._kl(part, h, z, z_lse))
                        lse.append(z_lse)
                        target.append(z_target)
                        del z
                    kl.append(torch.cat(token_kl).clamp_min(0).mean())
                    nll.append(_nll(torch.cat(lse), torch.cat(target)))
            del out
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


def head_is_last(model: nn.Module, head: nn.Module, ids: torch.Tensor) -> bool:
    """Whether ``model``'s logits on ``ids`` are just ``head`` applied to its last hidden state,
    as in the Llama family; models that post-process logits (soft-capping, scaling), or
    whose decoder cannot be called apart (remote code), are not."""
    with torch.inference_mode():
        full = model(input_ids=ids, use_cache=False).logits.float()
        try:
            hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        except AttributeError:
            return False
        split = head(hidden).float()
    return full.shape == split.shape and bool(torch.allclose(full, split, rtol=1e-4, atol=1e-4))


def _nll(lse: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of one window from its tokens' logsumexp and the logits of the
    tokens that follow them (one fewer: its last position has no target)."""
    return (lse[:-1] - target).mean()


def _logsumexp(z: torch.Tensor, rows: int = ROWS) -> torch.Tensor:
    """logsumexp over the last dim, a few rows at a time: the temporaries stay in cache,
    which is about twice as fast on CPU as one call over many rows."""
    return torch.cat([torch.logsumexp(z[i : i + rows], dim=-1) for i in range(0, len(z), rows)])
