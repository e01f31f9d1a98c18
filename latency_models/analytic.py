"""Closed-form FLOPs of the pieces of a decoder-only transformer forward pass.

Conventions follow ``torch.utils.flop_counter`` so the two can be compared exactly: a matmul
of (m x k) by (k x n) is 2*m*k*n FLOPs, elementwise work (norms, activations, softmax, rotary
embeddings, residual adds) and embedding lookups count zero, and attention scores are counted
for the full S x S matrix (causal masking does not halve them).
"""


def linear_flops(tokens: int, in_features: int, out_features: int) -> int:
    """FLOPs of a dense linear layer applied to ``tokens`` rows."""
    return 2 * tokens * in_features * out_features


def attention_score_flops(batch: int, seq_len: int, heads: int, head_dim: int) -> int:
    """FLOPs of Q @ K^T and of softmax(.) @ V for ``heads`` query heads."""
    return 2 * (2 * batch * heads * seq_len * seq_len * head_dim)
