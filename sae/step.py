"""One training step's loss for an SAE: a fast path for TopK, sae-lens's own pass for the rest.

The fast TopK step computes exactly the loss of sae-lens's TopKTrainingSAE
(MSE + AuxK, decoder-norm rescaling included) but never builds the dense
[batch, d_sae] activation matrix for the decoder: the encoder runs in bf16 (where the device has bf16 units) and the
decoder gathers the k active rows of W_dec, forward and backward. On CUDA, with triton
installed, the Triton kernels of sae/triton_topk.py run the decoder and also the encoder's
backward over the k active latents only, and the encoder's forward is fused with its top k
(sae/triton_encode.py) where that times faster than cuBLAS + torch.topk on the GPU at hand;
elsewhere torch's embedding_bag decodes and the encoder back-propagates through its dense product.

Given Matryoshka levels (sae=matryoshka_topk), the same step adds Matryoshka's nested losses
(Bussmann et al. 2025; Nabeshima 2024): each prefix of the dictionary, its first `width` latents,
reconstructs the input on its own from the same k active latents, so the first latents must carry the
broad features and cannot absorb them into their children. Each prefix is one more sparse decode of
the k latents with those outside it zeroed: far cheaper than sae-lens's Matryoshka BatchTopK pass.
Each prefix's loss has its own weight, smaller the deeper it lies (sae.matryoshka_balance): Chanin et
al. (2025) found that a plain sum makes the inner latents hedge, mixing in parts of their children.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from sae_lens.saes.sae import TrainCoefficientConfig, TrainingSAE, TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE

from activations.models import has_native_bf16


@dataclass
class StepOutput:
    loss: torch.Tensor  # what backward() runs on
    recon: torch.Tensor  # detached reconstruction [batch, d_in]
    fire_counts: torch.Tensor  # long [d_sae]: tokens of the batch each latent was active on
    l0: torch.Tensor  # mean active latents per token (scalar, detached)


def dense_encode(x, W_enc, b_enc, k, dtype):
    """One dense [tokens, d_sae] product, back-propagated densely; AuxK slices its dead columns."""
    pre = torch.addmm(b_enc.to(dtype), x.to(dtype), W_enc.to(dtype))
    values, latents = pre.topk(k, dim=-1, sorted=False)
    return values, latents, lambda dead: pre[:, dead]


def sparse_encode(top_k, x, W_enc, b_enc, k, dtype):
    """The top k back-propagated over those k latents only (`top_k`: sae.triton_topk.sparse_topk_encode);
    AuxK's dead latents get their own, far smaller, dense product."""
    values, latents = top_k(x, W_enc, b_enc, k, dtype)
    return values, latents, lambda dead: torch.addmm(b_enc[dead].to(dtype), x.to(dtype), W_enc[:, dead].to(dtype))


def torch_decode(latents, table, weights):
    return F.embedding_bag(latents, table, per_sample_weights=weights, mode="sum")


@dataclass(frozen=True)
class Kernels:
    """How the TopK step runs its products with the latents."""
    encode: Callable  # (x, W_enc, b_enc, k, dtype) -> top-k values, their latents, pre-activations of given latents
    decode: Callable  # (latents, W_dec, weights) -> sum_j weights[:, j] * W_dec[latents[:, j]]


TORCH_KERNELS = Kernels(dense_encode, torch_decode)


def triton_kernels() -> Kernels:
    from sae import triton_topk  # imported here: CPU runs never load triton

    return Kernels(functools.partial(sparse_encode, triton_topk.sparse_topk_encode), triton_topk.sparse_decode)


def kernels_for(device: torch.device, use_triton: bool) -> Kernels:
    """The Triton kernels on CUDA when asked for and installed, else torch's."""
    if use_triton and device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return triton_kernels()
    return TORCH_KERNELS


def _pick(norms: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """norms[indices], back-propagated by index_add: indexing's backward accumulates repeated indices
    in a thread-dependent order on the CPU, so two seeded runs drifted apart (FVU 0.22 against 0.17)."""
    return norms.index_select(0, indices.flatten()).view(indices.shape)


def _sparse_decode(sae: TopKTrainingSAE, values, indices, norms, decode):
    """sum_j values_j * W_dec[indices_j] (/ ||W_dec row|| when sae-lens rescales), without b_dec."""
    weights = values / _pick(norms, indices) if sae.cfg.rescale_acts_by_decoder_norm else values
    return decode(indices, sae.W_dec, weights)


def topk_step(sae: TopKTrainingSAE, x: torch.Tensor, dead_mask: torch.Tensor | None,
              bf16_encoder: bool | None = None, kernels: Kernels = TORCH_KERNELS,
              levels: tuple[tuple[int, float], ...] = ()) -> StepOutput:
    """bf16_encoder: None = where the device has bf16 units (elsewhere torch emulates bf16, about 100x slower)."""
    cfg = sae.cfg
    low = torch.bfloat16 if (has_native_bf16(x.device) if bf16_encoder is None else bf16_encoder) else x.dtype
    norms = sae.W_dec.norm(dim=-1)
    W_enc, b_enc = sae.W_enc, sae.b_enc
    if cfg.rescale_acts_by_decoder_norm:
        # sae-lens multiplies the [batch, d_sae] pre-activations by the decoder norms; scaling the
        # [d_in, d_sae] weights instead is the same function on far fewer numbers.
        W_enc, b_enc = W_enc * norms, b_enc * norms
    values, indices, pre_activations = kernels.encode(x - sae.b_dec, W_enc, b_enc, cfg.k, low)
    values = values.float().relu()
    recon = _sparse_decode(sae, values, indices, norms, kernels.decode) + sae.b_dec
    loss = (recon - x).pow(2).sum(-1).mean()
    for width, weight in levels:  # the inner prefixes; the whole dictionary's loss is the line above
        inner = _sparse_decode(sae, values * (indices < width), indices, norms, kernels.decode) + sae.b_dec
        loss = loss + weight * (inner - x).pow(2).sum(-1).mean()

    n_dead = int(dead_mask.sum()) if dead_mask is not None and cfg.aux_loss_coefficient > 0 else 0
    if n_dead:
        # AuxK (Gao et al. 2024, as sae-lens computes it): the top dead latents model the residual.
        half = cfg.d_in // 2
        scale = min(n_dead / half, 1.0)
        dead = dead_mask.nonzero().squeeze(1)
        aux_values, pos = pre_activations(dead).topk(min(half, n_dead), dim=-1, sorted=False)
        aux_recon = _aux_decode(sae, aux_values.float(), dead, pos, norms, low, kernels.decode)
        residual = (x - recon).detach()
        loss = loss + cfg.aux_loss_coefficient * scale * (aux_recon - residual).pow(2).sum(-1).mean()

    with torch.no_grad():
        active = values > 0
        counts = torch.bincount(indices[active], minlength=cfg.d_sae)
    return StepOutput(loss, recon.detach(), counts, active.sum(-1).float().mean())


def _aux_decode(sae: TopKTrainingSAE, values, dead, pos, norms, low, decode):
    """Decode the AuxK latents (positions `pos` among the `dead` ones). With many active dead
    latents a dense matmul over the dead rows of W_dec beats gathering rows one by one."""
    if pos.shape[-1] <= 64:
        return _sparse_decode(sae, values, dead[pos], norms, decode)
    if sae.cfg.rescale_acts_by_decoder_norm:
        values = values / _pick(norms[dead], pos)
    dense = torch.zeros(values.shape[0], dead.numel(), dtype=low, device=values.device)
    dense = dense.scatter(1, pos, values.to(low))
    return (dense @ sae.W_dec[dead].to(low)).float()


def coefficients(sae: TrainingSAE, step: int) -> dict[str, float]:
    """sae-lens's sparsity coefficients, warmed up linearly as its trainer does."""
    values = {}
    for name, coeff in sae.get_coefficients().items():
        if isinstance(coeff, TrainCoefficientConfig):
            warm = min(1.0, (step + 1) / coeff.warm_up_steps) if coeff.warm_up_steps else 1.0
            values[name] = coeff.value * warm
        else:
            values[name] = float(coeff)
    return values


def generic_step(sae: TrainingSAE, x: torch.Tensor, dead_mask: torch.Tensor | None, step: int) -> StepOutput:
    out = sae.training_forward_pass(
        TrainStepInput(sae_in=x, coefficients=coefficients(sae, step), dead_neuron_mask=dead_mask,
                       n_training_steps=step, is_logging_step=False)
    )
    with torch.no_grad():
        active = out.feature_acts > 0
    return StepOutput(out.loss, out.sae_out.detach(), active.sum(0), active.sum(-1).float().mean())


def training_step(sae: TrainingSAE, x: torch.Tensor, dead_mask: torch.Tensor | None, step: int,
                  bf16_encoder: bool | None = None, triton_kernels: bool = True, levels: tuple[tuple[int, float], ...] = ()) -> StepOutput:
    """levels: matryoshka_topk's inner levels and their weights (sae.architectures.inner_levels)."""
    # Subclasses (BatchTopK, Matryoshka) change the activation, so only plain TopK takes the fast path.
    if type(sae) is TopKTrainingSAE:
        return topk_step(sae, x, dead_mask, bf16_encoder, kernels_for(x.device, triton_kernels), levels)
    return generic_step(sae, x, dead_mask, step)
