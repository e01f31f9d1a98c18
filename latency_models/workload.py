"""What is timed: a prefill of B sequences of S tokens, or one decode step over a cache of S."""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("prefill", "decode")


@dataclass(frozen=True)
class Workload:
    kind: str  # "prefill" or "decode"
    batch: int
    seq_len: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"workload kind must be one of {KINDS}, not {self.kind!r}")
        if self.batch < 1 or self.seq_len < 1:
            raise ValueError("workload batch and sequence length must be at least 1")

    @property
    def prefill(self) -> bool:
        return self.kind == "prefill"

    @property
    def key(self) -> str:
        return f"{self.kind}-b{self.batch}-s{self.seq_len}"

    def describe(self) -> str:
        if self.prefill:
            return f"prefill of {self.batch}x{self.seq_len} tokens"
        return f"decode of {self.batch}x1 token over a KV cache of {self.seq_len}"


def both(batch: int, seq_len: int) -> tuple[Workload, Workload]:
    return Workload("prefill", batch, seq_len), Workload("decode", batch, seq_len)
