"""Kronos predictor: an autoregressive transformer over (s1, s2) token pairs.

Hierarchical embedding of (s1, s2) + temporal embedding -> causal transformer -> RMSNorm ->
dual head: s1 logits directly; s2 logits through a dependency-aware cross-attention layer that
conditions on an s1 embedding (teacher-forced, sampled, or the s1 just generated).

The s2 path is causal by default everywhere. The reference makes it non-causal in eval mode, so
its validation loss lets position t see context (and therefore the targets) after t; pass
`causal_s2=False` to reproduce those numbers for comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kronos_kit.model.checkpoint import CheckpointMixin
from kronos_kit.model.layers import CrossAttention, KVCache, RMSNorm, TransformerBlock

_TIME_SIZES = {"minute": 60, "hour": 24, "weekday": 7, "day": 32, "month": 13}
# calendar features in the order the predictor's checkpoints fix (its temporal embedding reads them so);
# the data layer builds its stamp columns from this
TIME_FEATURE_COLUMNS: tuple[str, ...] = tuple(_TIME_SIZES)
DEP_LAYER_HEADS = 4  # the reference builds the dependency layer with 4 heads whatever n_heads is


class HierarchicalEmbedding(nn.Module):
    """Embed s1 and s2 separately (scaled by sqrt(d_model)) and fuse them with a linear layer.

    Args:
        s1_bits: bits of the coarse token; its vocabulary has 2**s1_bits entries.
        s2_bits: bits of the fine token.
        d_model: embedding width.
    """

    def __init__(self, s1_bits: int, s2_bits: int, d_model: int):
        super().__init__()
        self.d_model = d_model
        self.emb_s1 = nn.Embedding(2**s1_bits, d_model)
        self.emb_s2 = nn.Embedding(2**s2_bits, d_model)
        self.fusion_proj = nn.Linear(2 * d_model, d_model)

    def forward(self, s1_ids: torch.Tensor, s2_ids: torch.Tensor) -> torch.Tensor:
        scale = math.sqrt(self.d_model)
        both = torch.cat([self.emb_s1(s1_ids) * scale, self.emb_s2(s2_ids) * scale], dim=-1)
        return self.fusion_proj(both)  # (B, T, d_model)


class FixedEmbedding(nn.Module):
    """Sinusoidal table, not trained (stored under `.emb.weight` as in the reference)."""

    def __init__(self, size: int, d_model: int):
        super().__init__()
        position = torch.arange(size).float()[:, None]
        div = torch.exp(torch.arange(0, d_model, 2).float() * -(math.log(10000.0) / d_model))
        table = torch.zeros(size, d_model)
        table[:, 0::2] = torch.sin(position * div)
        table[:, 1::2] = torch.cos(position * div)
        self.emb = nn.Embedding(size, d_model)
        self.emb.weight = nn.Parameter(table, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x).detach()


class TemporalEmbedding(nn.Module):
    """Sum of minute, hour, weekday, day and month embeddings; stamp is (B, T, 5) in that order.

    Args:
        d_model: embedding width.
        learn_te: True: trained tables; False: fixed sinusoidal ones.
    """

    def __init__(self, d_model: int, learn_te: bool):
        super().__init__()
        make = nn.Embedding if learn_te else FixedEmbedding
        for name in TIME_FEATURE_COLUMNS:
            setattr(self, f"{name}_embed", make(_TIME_SIZES[name], d_model))

    def forward(self, stamp: torch.Tensor) -> torch.Tensor:
        stamp = stamp.long()
        return sum(getattr(self, f"{name}_embed")(stamp[..., i]) for i, name in enumerate(TIME_FEATURE_COLUMNS))


class DependencyAwareLayer(nn.Module):
    """norm(context + cross_attn(query=s1 embedding, key=value=context)).

    Args:
        d_model: model width.
        n_heads: attention heads (the reference fixes 4, whatever the predictor's n_heads).
    """

    def __init__(self, d_model: int, n_heads: int = DEP_LAYER_HEADS):
        super().__init__()
        self.cross_attn = CrossAttention(d_model, n_heads, 0.0, 0.0)
        self.norm = RMSNorm(d_model)

    def forward(self, context, sibling_embed, *, causal=True, padding_mask=None) -> torch.Tensor:
        attn = self.cross_attn(sibling_embed, context, causal=causal, padding_mask=padding_mask)
        return self.norm(context + attn)


class DualHead(nn.Module):
    """Linear heads to the s1 logits and (after the dependency layer) the s2 logits.

    Args:
        s1_bits: bits of the coarse token (2**s1_bits logits).
        s2_bits: bits of the fine token (2**s2_bits logits).
        d_model: input width.
    """

    def __init__(self, s1_bits: int, s2_bits: int, d_model: int):
        super().__init__()
        self.vocab_s1, self.vocab_s2 = 2**s1_bits, 2**s2_bits
        self.proj_s1 = nn.Linear(d_model, self.vocab_s1)
        self.proj_s2 = nn.Linear(d_model, self.vocab_s2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_s1(x)

    def cond_forward(self, x2: torch.Tensor) -> torch.Tensor:
        return self.proj_s2(x2)

    def compute_loss(
        self,
        s1_logits: torch.Tensor,
        s2_logits: torch.Tensor,
        s1_targets: torch.Tensor,
        s2_targets: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, ce_s1, ce_s2) with loss = (ce_s1 + ce_s2) / 2; padded positions (mask 1) ignored."""
        if padding_mask is not None:
            valid = padding_mask == 0
            s1_logits, s2_logits = s1_logits[valid], s2_logits[valid]
            s1_targets, s2_targets = s1_targets[valid], s2_targets[valid]
        ce_s1, ce_s2 = next_token_cross_entropy(s1_logits, s2_logits, s1_targets, s2_targets)
        return (ce_s1 + ce_s2) / 2, ce_s1, ce_s2


def next_token_cross_entropy(s1_logits: torch.Tensor, s2_logits: torch.Tensor, s1_targets: torch.Tensor,
                             s2_targets: torch.Tensor, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the s1 and s2 heads on their targets (float32): the one formula training's loss
    (mean) and validation's summed NLL (`reduction="none"`, per token) share."""
    ce_s1 = F.cross_entropy(s1_logits.reshape(-1, s1_logits.shape[-1]).float(), s1_targets.reshape(-1),
                            reduction=reduction)
    ce_s2 = F.cross_entropy(s2_logits.reshape(-1, s2_logits.shape[-1]).float(), s2_targets.reshape(-1),
                            reduction=reduction)
    return ce_s1, ce_s2


@dataclass
class PredictorCache:
    """KV caches for incremental decoding: one per transformer block, one for the s2 layer."""

    blocks: list[KVCache]
    dep: KVCache = field(default_factory=KVCache)

    @classmethod
    def empty(cls, n_layers: int) -> PredictorCache:
        return cls([KVCache() for _ in range(n_layers)])

    @property
    def length(self) -> int:
        return self.blocks[0].length

    def share(self, n: int) -> None:
        """Each row so far becomes n rows sharing its cached positions (`KVCache.share`)."""
        for c in [*self.blocks, self.dep]:
            c.share(n)

    def drop_front(self, n: int) -> None:
        """Approximate sliding window: forget the oldest n positions everywhere."""
        for c in [*self.blocks, self.dep]:
            c.drop_front(n)


class PredictorLoss(NamedTuple):
    """Phase 2's loss and its parts (`Kronos.loss`)."""

    loss: torch.Tensor  # (ce_s1 + ce_s2) / 2
    ce_s1: torch.Tensor
    ce_s2: torch.Tensor


class NextTokenScores(NamedTuple):
    """Sums over one batch of next-token prediction (add them over batches, then divide by n_tokens)."""

    s1_nll: float
    s2_nll: float
    s1_hits: float
    s2_hits: float
    n_tokens: float


class Kronos(CheckpointMixin, nn.Module):
    """The Kronos predictor. Constructor arguments are the keys of the published `config.json`.

    Args:
        s1_bits: bits of the coarse token; must equal the tokenizer's (`check_pair`).
        s2_bits: bits of the fine token; must equal the tokenizer's.
        n_layers: transformer blocks.
        d_model: model width.
        n_heads: attention heads per block (d_model must divide by it).
        ff_dim: hidden width of each SwiGLU feed-forward.
        ffn_dropout_p: dropout after each feed-forward.
        attn_dropout_p: dropout on attention weights.
        resid_dropout_p: dropout on each attention output before the residual add.
        token_dropout_p: dropout on the summed token + time embedding.
        learn_te: True: trained time-feature embeddings; False: fixed sinusoidal tables.
    """

    def __init__(
        self,
        s1_bits: int,
        s2_bits: int,
        n_layers: int,
        d_model: int,
        n_heads: int,
        ff_dim: int,
        ffn_dropout_p: float,
        attn_dropout_p: float,
        resid_dropout_p: float,
        token_dropout_p: float,
        learn_te: bool,
    ):
        super().__init__()
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.s1_bits, self.s2_bits = s1_bits, s2_bits
        self.n_layers, self.d_model = n_layers, d_model
        self.s1_vocab_size = 2**s1_bits
        self.token_drop = nn.Dropout(token_dropout_p)
        self.embedding = HierarchicalEmbedding(s1_bits, s2_bits, d_model)
        self.time_emb = TemporalEmbedding(d_model, learn_te)
        self.transformer = nn.ModuleList(
            TransformerBlock(d_model, n_heads, ff_dim, ffn_dropout_p, attn_dropout_p, resid_dropout_p)
            for _ in range(n_layers)
        )
        self.norm = RMSNorm(d_model)
        self.dep_layer = DependencyAwareLayer(d_model)
        self.head = DualHead(s1_bits, s2_bits, d_model)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding) and module.weight.requires_grad:
            # the reference also overwrites the fixed sinusoidal tables here; we keep them sinusoidal
            nn.init.normal_(module.weight, mean=0.0, std=self.d_model**-0.5)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def _check_tokens(self, s1_ids: torch.Tensor, s2_ids: torch.Tensor, stamp: torch.Tensor | None) -> None:
        if s1_ids.shape != s2_ids.shape or s1_ids.dim() != 2:
            raise ValueError(
                f"s1_ids {tuple(s1_ids.shape)} and s2_ids {tuple(s2_ids.shape)} must both be (batch, time)"
            )
        if stamp is not None and (stamp.shape[:2] != s1_ids.shape or stamp.shape[-1] != len(TIME_FEATURE_COLUMNS)):
            raise ValueError(
                f"stamp has shape {tuple(stamp.shape)}; expected {(*s1_ids.shape, len(TIME_FEATURE_COLUMNS))} "
                f"with columns {', '.join(TIME_FEATURE_COLUMNS)}"
            )

    def _context(self, s1_ids, s2_ids, stamp, padding_mask, cache: PredictorCache | None) -> torch.Tensor:
        self._check_tokens(s1_ids, s2_ids, stamp)
        x = self.embedding(s1_ids, s2_ids)
        if stamp is not None:
            x = x + self.time_emb(stamp)
        x = self.token_drop(x)
        for i, block in enumerate(self.transformer):
            x = block(x, padding_mask=padding_mask, cache=None if cache is None else cache.blocks[i])
        return self.norm(x)  # (B, T, d_model)

    def forward(
        self,
        s1_ids: torch.Tensor,
        s2_ids: torch.Tensor,
        stamp: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        use_teacher_forcing: bool = False,
        s1_targets: torch.Tensor | None = None,
        *,
        causal_s2: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(s1_logits, s2_logits), each (B, T, vocab), for next-token prediction at every position.

        s2 is conditioned on `s1_targets` with teacher forcing, else on s1 sampled from the model's
        own s1 distribution (as the reference and the paper train).
        """
        context = self._context(s1_ids, s2_ids, stamp, padding_mask, None)
        s1_logits = self.head(context)
        if use_teacher_forcing:
            if s1_targets is None:
                raise ValueError("use_teacher_forcing=True needs s1_targets (the next s1 tokens)")
            sibling = s1_targets
        else:
            probs = F.softmax(s1_logits.detach().float(), dim=-1)
            sibling = torch.multinomial(probs.view(-1, self.s1_vocab_size), 1, generator=generator)
            sibling = sibling.view(s1_ids.shape)
        s2_logits = self.decode_s2(context, sibling, padding_mask, causal_s2=causal_s2)
        return s1_logits, s2_logits

    def loss(self, s1_logits: torch.Tensor, s2_logits: torch.Tensor, s1_targets: torch.Tensor,
             s2_targets: torch.Tensor, padding_mask: torch.Tensor | None = None) -> PredictorLoss:
        """Phase 2's loss of a forward's logits on next-token targets: (ce_s1 + ce_s2) / 2, padded positions
        (mask 1) ignored. Takes the logits (rather than running the forward) so a DDP-wrapped model's
        forward stays the call; validation's `score_next_tokens` uses the same cross-entropy."""
        return PredictorLoss(*self.head.compute_loss(s1_logits, s2_logits, s1_targets, s2_targets, padding_mask))

    @torch.no_grad()
    def score_next_tokens(self, s1: torch.Tensor, s2: torch.Tensor, stamp: torch.Tensor,
                          in_split: torch.Tensor | None = None) -> NextTokenScores:
        """Summed NLL and hits of next-token prediction on one batch of (B, T) tokens and (B, T, 5) stamps.

        The causal path with s2 conditioned on the true next s1: no RNG, no leak of the s2 target.
        Inputs are positions [:-1], targets [1:]. `in_split` (B, T) bool marks the bars that belong
        to the split being scored (a window's `in_split`); targets outside it (context bars borrowed
        from the previous split) still condition the model but are not scored.
        """
        l1, l2 = self(s1[:, :-1], s2[:, :-1], stamp[:, :-1], use_teacher_forcing=True, s1_targets=s1[:, 1:])
        t1, t2 = s1[:, 1:], s2[:, 1:]
        scored = (torch.ones_like(t1, dtype=torch.bool) if in_split is None
                  else torch.as_tensor(in_split, device=t1.device)[:, 1:].bool())  # (B, T-1)
        nll1, nll2 = (nll[scored.reshape(-1)] for nll in next_token_cross_entropy(l1, l2, t1, t2, reduction="none"))
        return NextTokenScores(nll1.sum().item(), nll2.sum().item(), ((l1.argmax(-1) == t1) & scored).sum().item(),
                               ((l2.argmax(-1) == t2) & scored).sum().item(), int(scored.sum()))

    def decode_s1(
        self,
        s1_ids: torch.Tensor,
        s2_ids: torch.Tensor,
        stamp: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        *,
        cache: PredictorCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(s1_logits, context). With `cache`, the inputs are the positions after the cached ones."""
        context = self._context(s1_ids, s2_ids, stamp, padding_mask, cache)
        return self.head(context), context

    def decode_s2(
        self,
        context: torch.Tensor,
        s1_ids: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        *,
        causal_s2: bool = True,
    ) -> torch.Tensor:
        """s2 logits given the context and the s1 tokens of the next step.

        With s1_ids of the context's length, position t sees context <= t (or every position with
        `causal_s2=False` in eval mode, the reference's leaking behaviour). With one s1 per row,
        that query attends to every context position, as in the reference's generation; the
        result broadcasts over the context positions like the reference (use the last one).
        """
        causal = causal_s2 or self.training
        x2 = self.dep_layer(context, self.embedding.emb_s1(s1_ids), causal=causal, padding_mask=padding_mask)
        return self.head.cond_forward(x2)

    def extend_s2_cache(self, context: torch.Tensor, cache: PredictorCache) -> None:
        """Add the s2 layer's key/value projections of new context positions to `cache.dep`."""
        cache.dep.append(*self.dep_layer.cross_attn.project_kv(context))

    def decode_s2_step(self, last_context: torch.Tensor, s1_ids: torch.Tensor, cache: PredictorCache) -> torch.Tensor:
        """Generation step: s2 logits (B, vocab) of the last position, given its sampled s1.

        Equals `decode_s2(context, s1_ids[:, None])[:, -1]` (one query against every context
        position, unrotated, as the reference generates), with the context's key/value
        projections taken from `cache.dep` instead of recomputed for the whole window.
        """
        sibling = self.embedding.emb_s1(s1_ids.view(-1, 1))  # (B, 1, d)
        x2 = self.dep_layer.norm(last_context + self.dep_layer.cross_attn.attend_one(sibling, cache.dep))
        return self.head.cond_forward(x2)[:, -1]
