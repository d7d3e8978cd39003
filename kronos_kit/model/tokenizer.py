"""Kronos tokenizer: a causal transformer autoencoder whose latent is quantized by BSQ.

Binary Spherical Quantization (Zhao et al., https://arxiv.org/abs/2406.07548): project to
`s1_bits + s2_bits` dims, L2-normalise, take the sign of each dim and scale by 1/sqrt(bits), so
every code lies on the unit sphere and the codebook is implicit (2**bits corners). The first
`s1_bits` form the coarse token s1, the rest the fine token s2.

Index bit order (as the reference, and as published checkpoints expect):
- `encode` / `decode` number bits least-significant first: s1 = sum_i b_i 2**i over dims
  [0, s1_bits), s2 likewise over [s1_bits, s1_bits + s2_bits), and the full index is
  s1 | s2 << s1_bits. (The reference predictor's `split_token` assumes the opposite order; the
  kit never round-trips through full indices, it always passes (s1, s2) pairs.)
- the quantizer's group entropy uses most-significant-first group codes; this only orders the
  entropy terms and does not reach any index a user sees.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kronos_kit.model.checkpoint import CheckpointMixin
from kronos_kit.model.layers import KVCache, TransformerBlock


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # (B, T, bits), entries +-1/sqrt(bits), straight-through gradient
    indices: torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # full index or (s1, s2)
    loss: torch.Tensor  # commitment + weighted entropy penalty; 0 when not asked for


class LossBreakdown(NamedTuple):
    """The unweighted parts of the BSQ loss (as vector-quantize-pytorch's LFQ returns them).

    loss = beta * commitment + zeta * (gamma0 * per_sample_entropy - gamma * codebook_entropy)
    """

    commitment: torch.Tensor  # mean squared distance of the normalised latent to its code
    per_sample_entropy: torch.Tensor  # low: each latent is confidently one code
    codebook_entropy: torch.Tensor  # high: the batch spreads over the codebook


class BinarySphericalQuantizer(nn.Module):
    """BSQ with the soft entropy penalty of the reference.

    loss = beta * commitment + zeta * (gamma0 * per_sample_entropy - gamma * codebook_entropy).

    The codebook entropy is approximated from independent pieces of the code, per `entropy_mode`:
    - "reference" (default): what the reference code computes, and so what the published
      checkpoints were trained with: its analytical branch overwrites the group probabilities
      with per-bit ones, so the "codebook entropy" is the sum over bits of the binary entropy of
      each bit's mean probability, and `group_size` has no effect.
    - "group": the intended group-wise approximation: the sum over `bits / group_size` groups of
      the entropy of the mean soft assignment to the 2**group_size group codes.
    """

    def __init__(
        self,
        *,
        s1_bits: int,  # coarse sub-token bits
        s2_bits: int,  # fine sub-token bits
        beta: float = 0.05,  # commitment loss weight
        gamma0: float = 1.0,  # per-sample entropy weight
        gamma: float = 1.1,  # codebook entropy weight
        zeta: float = 0.05,  # weight of the whole entropy penalty
        group_size: int = 4,  # bits per group in the "group" entropy approximation
        entropy_mode: str = "reference",  # "reference" (per-bit, as published) or "group"
    ):
        super().__init__()
        bits = s1_bits + s2_bits
        if bits % group_size:
            raise ValueError(
                f"s1_bits + s2_bits = {bits} must be divisible by group_size = {group_size}; "
                "choose a group_size that divides the total bit count"
            )
        self.s1_bits, self.s2_bits, self.bits = s1_bits, s2_bits, bits
        self.beta, self.gamma0, self.gamma, self.zeta = beta, gamma0, gamma, zeta
        self.group_size = group_size
        if entropy_mode not in ("reference", "group"):
            raise ValueError(f"entropy_mode must be 'reference' or 'group', got {entropy_mode!r}")
        self.entropy_mode = entropy_mode
        # persistent: the published checkpoints store these two buffers
        self.register_buffer("basis", 2 ** torch.arange(bits - 1, -1, -1))
        self.register_buffer("group_basis", 2 ** torch.arange(group_size - 1, -1, -1))
        # every group code, most significant bit first, in {-1, +1}
        codes = (torch.arange(2**group_size)[:, None] // self.group_basis[None, :]) % 2
        self.register_buffer("group_codebook", codes.float() * 2 - 1, persistent=False)

    @property
    def scale(self) -> float:
        return self.bits**-0.5

    def indices_to_codes(self, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        """Inverse of the (s1, s2) indices: (B, T) pair -> (B, T, bits) scaled codes."""
        bits = [
            (ids.unsqueeze(-1) >> torch.arange(n, device=ids.device)) & 1
            for ids, n in ((s1, self.s1_bits), (s2, self.s2_bits))
        ]
        return (torch.cat(bits, dim=-1).float() * 2 - 1) * self.scale

    def codes_to_indices(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bits = (codes >= 0).long()
        weights = 2 ** torch.arange(self.bits, device=codes.device)
        s1 = (bits[..., : self.s1_bits] * weights[: self.s1_bits]).sum(-1)
        s2 = (bits[..., self.s1_bits :] * weights[: self.s2_bits]).sum(-1)
        return s1, s2

    def entropies(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample entropy, codebook entropy) of normalised z, the latter per `entropy_mode`."""
        # per-sample entropy in closed form: each bit is +1 with prob sigmoid(4 z / sqrt(bits))
        p = torch.sigmoid(-4 * z * self.scale)
        probs = torch.stack([p, 1 - p], dim=-1)
        per_sample = _entropy(probs).sum(-1).mean()
        if self.entropy_mode == "reference":
            return per_sample, _entropy(self._batch_mean(probs.reshape(-1, *probs.shape[-2:]))).sum()
        # soft assignment of each group of bits to the 2**group_size group codes
        groups = z.reshape(*z.shape[:-1], -1, self.group_size)  # (..., G, g)
        logits = 2 * torch.einsum("...gc,dc->...gd", groups, self.group_codebook * self.scale)
        avg_prob = self._batch_mean(logits.softmax(-1).reshape(-1, *logits.shape[-2:]))  # (G, 2**g)
        return per_sample, _entropy(avg_prob).sum()

    def _batch_mean(self, probs: torch.Tensor) -> torch.Tensor:
        """Mean code probabilities over the batch; over the global batch when training under DDP.

        The codebook entropy is a batch statistic: averaging it per rank would train on a different
        objective than one process with the same global batch. The autograd all-reduce makes the two
        equal (gradients included).
        """
        mean = probs.mean(0)
        if self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from torch.distributed.nn.functional import all_reduce

            mean = all_reduce(mean) / dist.get_world_size()
        return mean

    def forward(self, z: torch.Tensor, *, half: bool = False, with_loss: bool = True,
                return_loss_breakdown: bool = False) -> QuantizerOutput | tuple[QuantizerOutput, LossBreakdown]:
        """Quantize z (B, T, bits); with `return_loss_breakdown`, also the loss's parts."""
        if z.shape[-1] != self.bits:
            raise ValueError(f"quantizer input has {z.shape[-1]} dims, expected s1_bits + s2_bits = {self.bits}")
        z = F.normalize(z.float(), dim=-1)  # quantize in fp32
        hard = torch.where(z > 0, 1.0, -1.0).to(z)
        quantized = (z + (hard - z).detach()) * self.scale  # straight-through
        s1, s2 = self.codes_to_indices(quantized)
        indices = (s1, s2) if half else s1 | (s2 << self.s1_bits)
        if not with_loss and not return_loss_breakdown:
            return QuantizerOutput(quantized, indices, quantized.new_zeros(()))
        commitment = ((quantized.detach() - z) ** 2).sum(-1).mean()
        per_sample, codebook = self.entropies(z)
        loss = self.beta * commitment + self.zeta * (self.gamma0 * per_sample - self.gamma * codebook)
        out = QuantizerOutput(quantized, indices, loss if with_loss else quantized.new_zeros(()))
        if return_loss_breakdown:
            return out, LossBreakdown(commitment, per_sample, codebook)
        return out


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * torch.log(probs + 1e-8)).sum(-1)


class _QuantizerSlot(nn.Module):
    """Holds the quantizer under the attribute path `tokenizer.bsq` used by the checkpoints."""

    def __init__(self, bsq: BinarySphericalQuantizer):
        super().__init__()
        self.bsq = bsq


class TokenizerOutput(NamedTuple):
    reconstructions: tuple[torch.Tensor, torch.Tensor]  # (z_pre from s1 bits, z from all bits)
    bsq_loss: torch.Tensor
    quantized: torch.Tensor
    indices: torch.Tensor


class TokenizerLoss(NamedTuple):
    """Phase 1's loss and its parts (`KronosTokenizer.loss`)."""

    loss: torch.Tensor  # (recon_s1 + recon_full + bsq) / 2, as the reference trains the tokenizer
    recon_s1: torch.Tensor  # mse of the s1-only reconstruction (z_pre) against x
    recon_full: torch.Tensor  # mse of the full reconstruction (z) against x
    bsq: torch.Tensor  # the quantizer's loss
    breakdown: LossBreakdown | None  # the BSQ loss's unweighted parts, when the forward returned them


class KronosTokenizer(CheckpointMixin, nn.Module):
    """Encoder -> BSQ -> decoder over bars of `d_in` features (open, high, low, close, volume, amount).

    Constructor arguments are the keys of the published `config.json`.

    Args:
        d_in: features per bar (6).
        d_model: model width.
        n_heads: attention heads per block (d_model must divide by it).
        ff_dim: hidden width of each SwiGLU feed-forward.
        n_enc_layers: encoder depth counting the input projection, as the reference: n - 1 blocks.
        n_dec_layers: decoder depth counting the output projection: n - 1 blocks.
        ffn_dropout_p: dropout after each feed-forward.
        attn_dropout_p: dropout on attention weights.
        resid_dropout_p: dropout on each attention output before the residual add.
        s1_bits: bits of the coarse token s1 (the predictor's first vocabulary).
        s2_bits: bits of the fine token s2.
        beta: BSQ commitment loss weight.
        gamma0: BSQ per-sample entropy weight.
        gamma: BSQ codebook entropy weight.
        zeta: weight of the whole BSQ entropy penalty.
        group_size: bits per group of the "group" codebook-entropy approximation.
    """

    def __init__(
        self,
        d_in: int,
        d_model: int,
        n_heads: int,
        ff_dim: int,
        n_enc_layers: int,
        n_dec_layers: int,
        ffn_dropout_p: float,
        attn_dropout_p: float,
        resid_dropout_p: float,
        s1_bits: int,
        s2_bits: int,
        beta: float,
        gamma0: float,
        gamma: float,
        zeta: float,
        group_size: int,
    ):
        super().__init__()
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.d_in, self.d_model = d_in, d_model
        self.s1_bits, self.s2_bits = s1_bits, s2_bits
        self.codebook_dim = s1_bits + s2_bits

        def blocks(n: int) -> nn.ModuleList:
            return nn.ModuleList(
                TransformerBlock(d_model, n_heads, ff_dim, ffn_dropout_p, attn_dropout_p, resid_dropout_p)
                for _ in range(n - 1)
            )

        self.embed = nn.Linear(d_in, d_model)
        self.encoder = blocks(n_enc_layers)
        self.quant_embed = nn.Linear(d_model, self.codebook_dim)
        self.tokenizer = _QuantizerSlot(
            BinarySphericalQuantizer(
                s1_bits=s1_bits, s2_bits=s2_bits, beta=beta, gamma0=gamma0, gamma=gamma, zeta=zeta,
                group_size=group_size,
            )
        )
        self.post_quant_embed_pre = nn.Linear(s1_bits, d_model)
        self.post_quant_embed = nn.Linear(self.codebook_dim, d_model)
        self.decoder = blocks(n_dec_layers)
        self.head = nn.Linear(d_model, d_in)

    @property
    def quantizer(self) -> BinarySphericalQuantizer:
        return self.tokenizer.bsq

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.d_in:
            raise ValueError(
                f"tokenizer input x has shape {tuple(x.shape)}; expected (batch, time, {self.d_in}) "
                "with features open, high, low, close, volume, amount"
            )

    def _encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        z = self.embed(x)
        for block in self.encoder:
            z = block(z)
        return self.quant_embed(z)  # (B, T, bits)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        for block in self.decoder:
            z = block(z)
        return self.head(z)  # (B, T, d_in)

    def forward(self, x: torch.Tensor, *, return_loss_breakdown: bool = False, loss_mask: torch.Tensor | None = None
                ) -> TokenizerOutput | tuple[TokenizerOutput, LossBreakdown]:
        """x (B, T, d_in) -> ((z_pre, z), bsq_loss, quantized, indices), the reference's order.

        With `return_loss_breakdown`, `(output, LossBreakdown)`: the BSQ loss's unweighted parts.
        `loss_mask` (B, T) bool computes the BSQ loss over those bars only (e.g. a validation window's
        in-split bars), window by window, averaged with weights the windows' masked bar counts: the
        codebook entropy is a batch statistic, and per window it does not depend on how windows are
        batched. The reconstructions and codes are the same.
        """
        latent = self._encode_latent(x)
        if loss_mask is None:
            q = self.quantizer(latent, return_loss_breakdown=return_loss_breakdown)
            q, breakdown = q if return_loss_breakdown else (q, None)
        else:
            loss, breakdown = self._masked_bsq(latent, loss_mask.to(latent.device, torch.bool))
            q = self.quantizer(latent, with_loss=False)._replace(loss=loss)
        quantized = q.quantized.to(x.dtype)
        z_pre = self._decode(self.post_quant_embed_pre(quantized[..., : self.s1_bits]))
        z = self._decode(self.post_quant_embed(quantized))
        out = TokenizerOutput((z_pre, z), q.loss, quantized, q.indices)
        return (out, breakdown) if return_loss_breakdown else out

    def _masked_bsq(self, latent: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, LossBreakdown]:
        """BSQ loss and parts over each window's masked bars, averaged over windows by masked bar count."""
        n = mask.sum(1)
        parts = []
        for z, m in zip(latent[n > 0], mask[n > 0]):
            q, b = self.quantizer(z[m][None], return_loss_breakdown=True)
            parts.append(torch.stack([q.loss, *b]))
        if not parts:
            nan = latent.new_full((), float("nan"))
            return nan, LossBreakdown(nan, nan, nan)
        w = n[n > 0].to(latent.dtype)
        mean = (torch.stack(parts) * w[:, None]).sum(0) / w.sum()
        return mean[0], LossBreakdown(*mean[1:])

    @staticmethod
    def loss(x: torch.Tensor, output: TokenizerOutput, breakdown: LossBreakdown | None = None) -> TokenizerLoss:
        """Phase 1's loss of a forward `output` on input `x`: (mse(z_pre, x) + mse(z, x) + bsq_loss) / 2.

        Takes the forward's output (rather than running it) so a DDP-wrapped model's forward stays the call.
        """
        z_pre, z = output.reconstructions
        recon_s1, recon_full = F.mse_loss(z_pre, x), F.mse_loss(z, x)
        return TokenizerLoss((recon_s1 + recon_full + output.bsq_loss) / 2, recon_s1, recon_full, output.bsq_loss,
                             breakdown)

    def encode(self, x: torch.Tensor, half: bool = False):
        """Indices of x: one (B, T) tensor, or `(s1_ids, s2_ids)` with `half=True`."""
        return self.quantizer(self._encode_latent(x), half=half, with_loss=False).indices

    def indices_to_bits(self, indices, half: bool = False) -> torch.Tensor:
        if half:
            s1, s2 = indices
        else:
            s1, s2 = indices & ((1 << self.s1_bits) - 1), indices >> self.s1_bits
        if s1.shape != s2.shape:
            raise ValueError(f"s1 indices {tuple(s1.shape)} and s2 indices {tuple(s2.shape)} differ in shape")
        return self.quantizer.indices_to_codes(s1.long(), s2.long()).to(self.head.weight.dtype)

    def decode(self, indices, half: bool = False) -> torch.Tensor:
        """Reconstruct (B, T, d_in) from a full index tensor or, with `half=True`, `[s1, s2]`."""
        return self._decode(self.post_quant_embed(self.indices_to_bits(indices, half)))

    def decode_paths(self, s1: torch.Tensor, s2: torch.Tensor, *, history: int, paths: int) -> torch.Tensor:
        """Decode the bars after the first `history` positions of (R, T) token pairs, (R, T - history, d_in).

        The rows are sample paths, `paths` consecutive rows per series, whose first `history` tokens
        are the series' own. The decoder is causal, so those positions' keys and values do not depend
        on the path: they are computed once per series and attended by each of its paths
        (`KVCache.share`); their outputs are not needed, so the last block only caches them. Equals
        `decode([s1, s2], half=True)[:, history:]` up to float rounding.
        """
        caches = [KVCache() for _ in self.decoder]
        if history:
            z = self.post_quant_embed(self.indices_to_bits([s1[::paths, :history], s2[::paths, :history]], half=True))
            for i, (block, cache) in enumerate(zip(self.decoder, caches)):
                if i + 1 < len(self.decoder):
                    z = block(z, cache=cache)
                else:
                    block.extend_cache(z, cache)
                cache.share(paths)
        z = self.post_quant_embed(self.indices_to_bits([s1[:, history:], s2[:, history:]], half=True))
        for block, cache in zip(self.decoder, caches):
            z = block(z, cache=cache)
        return self.head(z)

    def decode_s1(self, s1_ids: torch.Tensor) -> torch.Tensor:
        """Reconstruct from the coarse tokens alone (the s1-only decoder of `forward`)."""
        bits = self.quantizer.indices_to_codes(s1_ids.long(), torch.zeros_like(s1_ids).long())
        return self._decode(self.post_quant_embed_pre(bits[..., : self.s1_bits].to(self.head.weight.dtype)))
