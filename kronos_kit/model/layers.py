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
    """Keys and values of the positions seen so far, (rows, n_heads, T, head_dim) each.

    Stored in preallocated buffers: a chunk of positions (a prefill) gets a buffer of its size, and
    single positions (generation steps) grow it by doubling, so appending one position copies one
    position (re-concatenating would copy the whole cache at every generated bar).

    `share(n)` makes the positions cached so far a prefix shared by each group of n consecutive
    rows (one series' n sample paths continue one history): it is kept and attended once per group
    instead of copied n times, and positions appended afterwards belong to each row.
    """

    def __init__(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.own = 0  # positions stored per row (after the shared prefix)
        self.shared_k: torch.Tensor | None = None  # (groups, n_heads, P, head_dim), attended by `group` rows each
        self.shared_v: torch.Tensor | None = None
        self.group = 1
        self.dropped = 0  # positions trimmed from the front; rotary positions keep counting from here

    @property
    def shared_length(self) -> int:
        return 0 if self.shared_k is None else self.shared_k.shape[-2]

    @property
    def length(self) -> int:
        return self.shared_length + self.own

    @property
    def k(self) -> torch.Tensor | None:
        """Each row's own keys (every key when nothing is shared)."""
        return None if self._k is None else self._k[:, :, : self.own]

    @property
    def v(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, : self.own]

    @property
    def next_position(self) -> int:
        return self.dropped + self.length

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the keys and values of new positions; returns each row's own ones so far."""
        n = k.shape[-2]
        if self._k is None or self.own + n > self._k.shape[-2]:
            capacity = self.own + n if n > 1 else max(16, 2 * (self.own + n))
            grown_k = k.new_empty(*k.shape[:-2], capacity, k.shape[-1])
            grown_v = v.new_empty(*v.shape[:-2], capacity, v.shape[-1])
            if self.own:
                grown_k[:, :, : self.own] = self.k
                grown_v[:, :, : self.own] = self.v
            self._k, self._v = grown_k, grown_v
        self._k[:, :, self.own : self.own + n] = k
        self._v[:, :, self.own : self.own + n] = v
        self.own += n
        return self.k, self.v

    def share(self, n: int) -> None:
        """Each row so far becomes a group of n rows that share its cached positions as a prefix."""
        if n == 1 or self._k is None:
            return
        if self.shared_k is not None:
            raise ValueError("KVCache.share: this cache already has a shared prefix")
        self.shared_k, self.shared_v = self.k, self.v
        self._k = self._v = None
        self.own, self.group = 0, n

    def drop_front(self, n: int) -> None:
        """Forget the oldest n positions, shared ones first (approximate sliding window)."""
        if n <= 0:
            return
        shared = min(n, self.shared_length)
        if shared == self.shared_length:
            self.shared_k = self.shared_v = None
        elif shared:
            self.shared_k, self.shared_v = self.shared_k[:, :, shared:], self.shared_v[:, :, shared:]
        if n > shared and self._k is not None:
            self._k, self._v = self._k[:, :, n - shared :], self._v[:, :, n - shared :]
            self.own -= n - shared
        self.dropped += n


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


def shared_prefix_attention(q: torch.Tensor, cache: KVCache, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over a cache with a shared prefix: (rows, t, H * d) for (rows, H, t, d) queries.

    The queries are each row's last t own positions (`causal`: each sees its own positions up to
    itself) or, when the row has no own positions yet, queries from outside (the s2 layer's). Every
    row sees its group's shared prefix in full: those scores are one (n * t) x P product per group and
    head; a row's few own positions are products of its own.
    """
    rows, heads, t, d = q.shape
    groups, n, p = cache.shared_k.shape[0], cache.group, cache.shared_length
    own_k, own_v = cache.k, cache.v
    own = 0 if own_k is None else own_k.shape[-2]
    q = q * d**-0.5  # scaling the few queries rather than the many scores: exact when d is a power of 4
    grouped_q = q.reshape(groups, n, heads, t, d).transpose(1, 2).reshape(groups * heads, n * t, d)
    keys = cache.shared_k.reshape(groups * heads, p, d)
    if own:  # zero keys stand in for each row's own ones, so the product lays out the whole score table
        keys = torch.cat([keys, keys.new_zeros(groups * heads, own, d)], 1)
    scores = torch.bmm(grouped_q, keys.transpose(1, 2)).view(groups, heads, n, t, p + own)
    if own:
        own_scores = q @ own_k.transpose(-2, -1)  # (rows, H, t, own)
        if causal and t > 1:
            own_scores = own_scores.masked_fill(~_causal_mask(t, own, q.device), float("-inf"))
        scores[..., p:] = own_scores.view(groups, n, heads, t, own).transpose(1, 2)
    weights = torch.softmax(scores, dim=-1)
    out = torch.bmm(weights.view(groups * heads, n * t, p + own)[..., :p], cache.shared_v.reshape(groups * heads, p, d))
    out = out.view(groups, heads, n, t, d).permute(0, 2, 3, 1, 4).reshape(rows, t, heads * d)
    if own:
        own_weights = weights[..., p:].transpose(1, 2).reshape(rows, heads, t, own)
        if t == 1:  # elementwise: ~2x faster than thousands of 1-row matrix products
            own_out = (own_weights[:, :, 0, :, None] * own_v).sum(-2)[:, None]  # (rows, 1, H, d)
        else:
            own_out = (own_weights @ own_v).transpose(1, 2)  # (rows, t, H, d)
        out = out + own_out.reshape(rows, t, heads * d)
    return out


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
        return self._project(out.transpose(1, 2).reshape(b, t, self.d_model))

    def _project(self, out: torch.Tensor) -> torch.Tensor:
        return self.resid_dropout(self.out_proj(out))  # (B, T, d_model), heads side by side


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
            if cache.shared_k is not None:
                if padding_mask is not None:
                    raise ValueError("a KV cache with a shared prefix takes no padding_mask")
                return self._project(shared_prefix_attention(q, cache, causal=True))
        mask = None
        if (past > 0 and t > 1) or padding_mask is not None:
            mask = _with_padding(_causal_mask(t, past + t, x.device), padding_mask)
        # a single new query may see every cached position: no mask needed
        return self._attend(q, k, v, mask, is_causal=past == 0 and t > 1)

    def extend_cache(self, x: torch.Tensor, cache: KVCache) -> None:
        """Store the keys and values of positions `x` (after the cached ones) without attending: all
        that later positions need of them (the same keys and values `forward` stores)."""
        k, v = self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        cos, sin = self.rotary.cos_sin(cache.next_position, x.shape[1], x.device)
        cache.append(RotaryEmbedding.rotate(k, cos, sin), v)


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
        q = self._heads(self.q_proj(query))
        if cache.shared_k is not None:
            return self._project(shared_prefix_attention(q, cache, causal=False))
        return self._attend(q, cache.k, cache.v, None, is_causal=False)


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

    def extend_cache(self, x: torch.Tensor, cache: KVCache) -> None:
        """Cache the keys and values of positions `x` whose outputs are not needed (`SelfAttention.extend_cache`)."""
        self.self_attn.extend_cache(self.norm1(x), cache)
