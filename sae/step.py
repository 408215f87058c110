"""One training step's loss for an SAE: a fast path for TopK, sae-lens's own pass for the rest.

The fast TopK step computes exactly the loss of sae-lens's TopKTrainingSAE
(MSE + AuxK, decoder-norm rescaling included) but never builds the dense
[batch, d_sae] activation matrix for the decoder: the encoder runs in bf16 and the
decoder gathers the k active rows of W_dec, forward and backward: on CUDA with the Triton
kernels of sae/triton_decoder.py (when triton is installed), elsewhere with torch's `embedding_bag`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sae_lens.saes.sae import TrainCoefficientConfig, TrainingSAE, TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE


@dataclass
class StepOutput:
    loss: torch.Tensor  # what backward() runs on
    recon: torch.Tensor  # detached reconstruction [batch, d_in]
    fire_counts: torch.Tensor  # long [d_sae]: tokens of the batch each latent was active on
    l0: torch.Tensor  # mean active latents per token (scalar, detached)


def torch_decode(indices, table, weights):
    return F.embedding_bag(indices, table, per_sample_weights=weights, mode="sum")


def decoder_for(device: torch.device, triton_decoder: bool):
    """The Triton decoder on CUDA when asked for and installed, else torch's embedding_bag."""
    if triton_decoder and device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        from sae.triton_decoder import sparse_decode  # imported here: CPU runs never load triton
        return sparse_decode
    return torch_decode


def _sparse_decode(sae: TopKTrainingSAE, values, indices, norms, decode):
    """sum_j values_j * W_dec[indices_j] (/ ||W_dec row|| when sae-lens rescales), without b_dec."""
    weights = values / norms[indices] if sae.cfg.rescale_acts_by_decoder_norm else values
    return decode(indices, sae.W_dec, weights)


def topk_step(sae: TopKTrainingSAE, x: torch.Tensor, dead_mask: torch.Tensor | None,
              bf16_encoder: bool = True, decode=torch_decode) -> StepOutput:
    """`decode(indices, W_dec, weights)` is torch_decode or sae.triton_decoder.sparse_decode."""
    cfg = sae.cfg
    low = torch.bfloat16 if bf16_encoder else x.dtype
    norms = sae.W_dec.norm(dim=-1)
    W_enc, b_enc = sae.W_enc, sae.b_enc
    if cfg.rescale_acts_by_decoder_norm:
        # sae-lens multiplies the [batch, d_sae] pre-activations by the decoder norms; scaling the
        # [d_in, d_sae] weights instead is the same function on far fewer numbers.
        W_enc, b_enc = W_enc * norms, b_enc * norms
    hidden_pre = torch.addmm(b_enc.to(low), (x - sae.b_dec).to(low), W_enc.to(low))
    values, indices = hidden_pre.topk(cfg.k, dim=-1, sorted=False)
    values = values.float().relu()
    recon = _sparse_decode(sae, values, indices, norms, decode) + sae.b_dec
    loss = (recon - x).pow(2).sum(-1).mean()

    n_dead = int(dead_mask.sum()) if dead_mask is not None and cfg.aux_loss_coefficient > 0 else 0
    if n_dead:
        # AuxK (Gao et al. 2024, as sae-lens computes it): the top dead latents model the residual.
        half = cfg.d_in // 2
        scale = min(n_dead / half, 1.0)
        dead = dead_mask.nonzero().squeeze(1)
        aux_values, pos = hidden_pre[:, dead].topk(min(half, n_dead), dim=-1, sorted=False)
        aux_recon = _aux_decode(sae, aux_values.float(), dead, pos, norms, low, decode)
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
        values = values / norms[dead][pos]
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
                  bf16_encoder: bool = True, triton_decoder: bool = True) -> StepOutput:
    # Subclasses (BatchTopK, Matryoshka) change the activation, so only plain TopK takes the fast path.
    if type(sae) is TopKTrainingSAE:
        return topk_step(sae, x, dead_mask, bf16_encoder, decoder_for(x.device, triton_decoder))
    return generic_step(sae, x, dead_mask, step)
