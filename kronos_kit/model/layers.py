"""Transformer parts shared by the Kronos tokenizer and predictor.

RMSNorm -> rotary embedding -> self-attention (with KV cache) -> cross-attention (dependency layer)
-> SwiGLU feed-forward -> pre-norm block. Parameter and buffer names match the reference
implementation (shiyu-coder/Kronos `model/module.py`) so published checkpoints load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight, in fp32.

    Args:
        dim: width of the last dimension.
        eps: guard inside the square root.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # normalise in fp32 even under autocast
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x).

    Args:
        d_model: input and output width.
        ff_dim: hidden width.
        ffn_dropout_p: dropout on the output.
    """

    def __init__(self, d_model: int, ff_dim: int, ffn_dropout_p: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(d_model, ff_dim, bias=False)
        self.w3 = nn.Linear(d_model, ff_dim, bias=False)
        self.w2 = nn.Linear(ff_dim, d_model, bias=False)
        self.ffn_dropout = nn.Dropout(ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over the head dimension.

    cos/sin are computed from `inv_freq` for the positions asked for, on the input's device, so a
    module moved with `.to()` never uses a stale table (the reference caches them by length only).
    `inv_freq` stays a persistent buffer because published checkpoints store it.

    Args:
        dim: head dimension (even).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def cos_sin(self, start: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq.to(device)
        t = torch.arange(start, start + length, device=device).type_as(inv_freq)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[None, None], emb.sin()[None, None]  # (1, 1, T, head_dim)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos.to(x.dtype) + torch.cat((-x2, x1), dim=-1) * sin.to(x.dtype)


class KVCache:
    """Keys and values of the positions seen so far, (B, n_heads, T, head_dim) each.

    Stored in preallocated buffers that grow by doubling, so appending one position copies one
    position (re-concatenating would copy the whole cache at every generated bar).
    """

    def __init__(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.length = 0
        self.dropped = 0  # positions trimmed from the front; rotary positions keep counting from here

    @property
    def k(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, : self.length]

    @property
    def v(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, : self.length]

    @property
    def next_position(self) -> int:
        return self.dropped + self.length

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[-2]
        if self._k is None or self.length + n > self._k.shape[-2]:
            capacity = max(64, 2 * (self.length + n))
            grown_k = k.new_empty(*k.shape[:-2], capacity, k.shape[-1])
            grown_v = v.new_empty(*v.shape[:-2], capacity, v.shape[-1])
            if self.length:
                grown_k[:, :, : self.length] = self.k
                grown_v[:, :, : self.length] = self.v
            self._k, self._v = grown_k, grown_v
        self._k[:, :, self.length : self.length + n] = k
        self._v[:, :, self.length : self.length + n] = v
        self.length += n
        return self.k, self.v

    def drop_front(self, n: int) -> None:
        """Forget the oldest n positions (approximate sliding window)."""
        if self._k is not None and n > 0:
            self._k, self._v = self._k[:, :, n:], self._v[:, :, n:]
            self.length -= n
            self.dropped += n

    def repeat_interleave(self, n: int) -> None:
        """Expand the batch n-fold (one shared history -> n sample paths)."""
        if self._k is not None:
            self._k = self._k.repeat_interleave(n, dim=0)
            self._v = self._v.repeat_interleave(n, dim=0)


def _causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Boolean mask (True = attend) for queries that are the last `q_len` of `k_len` positions."""
    offset = k_len - q_len
    q_pos = torch.arange(q_len, device=device)[:, None] + offset
    return torch.arange(k_len, device=device)[None, :] <= q_pos


def _with_padding(mask: torch.Tensor | None, padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Combine a (q, k) mask with a (B, k) padding mask (True/1 = padded, ignored).

    A query may always see its own position, so a padded query gets a finite (ignored) output
    instead of NaN from a fully masked row.
    """
    if padding_mask is None:
        return mask
    keep = ~padding_mask.bool()[:, None, None, :]  # (B, 1, 1, k)
    if mask is None:
        return keep
    q_len, k_len = mask.shape
    own = torch.arange(k_len, device=mask.device)[None, :] == (
        torch.arange(q_len, device=mask.device)[:, None] + k_len - q_len
    )
    return (keep & mask[None, None]) | own[None, None]


class _Attention(nn.Module):
    """Multi-head attention projections shared by self- and cross-attention.

    Args:
        d_model: model width (divisible by n_heads).
        n_heads: attention heads.
        attn_dropout_p: dropout on attention weights (training only).
        resid_dropout_p: dropout on the output projection.
    """

    def __init__(self, d_model: int, n_heads: int, attn_dropout_p: float, resid_dropout_p: float):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.rotary = RotaryEmbedding(self.head_dim)
        self.attn_dropout_p = attn_dropout_p
        self.resid_dropout = nn.Dropout(resid_dropout_p)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def _attend(self, q, k, v, mask, is_causal: bool) -> torch.Tensor:
        if q.shape[-2] == 1 and mask is None and not self.training:
            # one query (a generation step): a plain matvec; the CPU flash kernel is ~50x slower
            # on the strided views of a KV cache
            weights = torch.softmax((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask,
                dropout_p=self.attn_dropout_p if self.training else 0.0,
                is_causal=is_causal and mask is None,
            )
        b, _, t, _ = out.shape
        return self.resid_dropout(self.out_proj(out.transpose(1, 2).reshape(b, t, self.d_model)))


class SelfAttention(_Attention):
    """Causal multi-head self-attention with rotary positions and an optional KV cache.

    With a cache, `x` holds the positions after those already cached; rotary positions continue
    from the cache length, so one new bar costs one position.
    """

    def forward(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        t = x.shape[1]
        past = 0 if cache is None else cache.length
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        cos, sin = self.rotary.cos_sin(0 if cache is None else cache.next_position, t, x.device)
        q, k = RotaryEmbedding.rotate(q, cos, sin), RotaryEmbedding.rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)
        mask = None
        if (past > 0 and t > 1) or padding_mask is not None:
            mask = _with_padding(_causal_mask(t, past + t, x.device), padding_mask)
        # a single new query may see every cached position: no mask needed
        return self._attend(q, k, v, mask, is_causal=past == 0 and t > 1)


class CrossAttention(_Attention):
    """Attention of sibling (s1) embeddings over the transformer context, used by the s2 head.

    Three regimes, all matching the reference where the reference is right:
    - full sequence, `causal=True`: query t sees context <= t, rotary on both (reference training);
    - full sequence, `causal=False`: every query sees every position (the reference in eval mode,
      which leaks future context, i.e. the targets, into the s2 logits; kept for comparison);
    - one query against the whole context (inference): the reference builds rotary for length 1,
      i.e. position 0 for the query and every key, so neither is rotated.
    """

    def forward(
        self,
        query: torch.Tensor,
        context: torch.Tensor,
        *,
        causal: bool = True,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q_len = query.shape[1]
        q = self._heads(self.q_proj(query))
        k, v = self.project_kv(context)
        k_len = k.shape[2]
        if q_len == 1:
            return self._attend(q, k, v, _with_padding(None, padding_mask), is_causal=False)
        if q_len != k_len:
            raise ValueError(f"cross-attention query length {q_len} must be 1 or equal context length {k_len}")
        cos, sin = self.rotary.cos_sin(0, q_len, query.device)
        q, k = RotaryEmbedding.rotate(q, cos, sin), RotaryEmbedding.rotate(k, cos, sin)
        mask = None
        if padding_mask is not None:
            full = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device)
            mask = _with_padding(_causal_mask(q_len, k_len, query.device) if causal else full, padding_mask)
        return self._attend(q, k, v, mask, is_causal=causal)

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value projections of context positions, (B, H, T, hd) each (cacheable)."""
        return self._heads(self.k_proj(context)), self._heads(self.v_proj(context))

    def attend_one(self, query: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One query per row (B, 1, d) against every cached context position (generation)."""
        return self._attend(self._heads(self.q_proj(query)), cache.k, cache.v, None, is_causal=False)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)).

    Args:
        d_model: model width.
        n_heads: attention heads (d_model must divide by it).
        ff_dim: hidden width of the SwiGLU feed-forward.
        ffn_dropout_p: dropout after the feed-forward.
        attn_dropout_p: dropout on attention weights.
        resid_dropout_p: dropout on the attention output.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        ff_dim: int,
        ffn_dropout_p: float = 0.0,
        attn_dropout_p: float = 0.0,
        resid_dropout_p: float = 0.0,
    ):
        super().__init__()
        self.norm1 = RMSNorm(d_model)
        self.self_attn = SelfAttention(d_model, n_heads, attn_dropout_p, resid_dropout_p)
        self.norm2 = RMSNorm(d_model)
        self.ffn = FeedForward(d_model, ff_dim, ffn_dropout_p)

    def forward(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), padding_mask=padding_mask, cache=cache)
        return x + self.ffn(self.norm2(x))
