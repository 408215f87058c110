"""The TopK step's sparse products as Triton kernels: the decoder forward and backward, and the
encoder's backward, touching only the k active latents of each token.

A TopK SAE's token uses k of the d_sae latents, so every product that involves the latents is a
sum over k (token, latent) pairs. Three kernels compute them, and never build a dense
[batch, d_sae] matrix:
- gather_sum: out[t] = sum_j w[t, j] * table[latent[t, j]] (one program per token and block of
  columns; the decoder's forward, and the encoder's gradient of its input);
- gather_dot: out[t, j] = rows[t] . table[latent[t, j]] (the decoder's gradient of the activations);
- scatter_sum: out[l] = sum over the pairs (t, j) with latent[t, j] = l of w[t, j] * rows[t]
  (the gradients of W_dec and of W_enc): the pairs are sorted by latent, each program walks a
  run of them, sums while the latent stays the same, and adds the sum into that latent's row
  once (an atomic add only where a run of a latent ends, or the program's share does).
Accumulation is in float32. The encoder's forward (its matmul and top k) is sae/triton_encode.py's.
sae/step.py uses them on CUDA; under TRITON_INTERPRET=1 the same
kernels run on CPU tensors, which is how tests/test_topk_step.py checks them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sae import triton_encode

BLOCK_D = 128  # columns (d_in) per program
BLOCK_K = 16  # active latents loaded at once
PAIRS_PER_PROGRAM = 64  # sorted (token, latent) pairs one scatter_sum program walks


@triton.jit
def _gather_sum_kernel(latents, weights, table, out, K, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    token, cols = tl.program_id(0), tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        rows = tl.load(latents + token * K + ks, mask=k_ok, other=0).to(tl.int64)
        w = tl.load(weights + token * K + ks, mask=k_ok, other=0.0).to(tl.float32)
        tile = tl.load(table + rows[:, None] * D + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(tile.to(tl.float32) * w[:, None], axis=0)
    tl.store(out + token.to(tl.int64) * D + cols, acc, mask=col_ok)


@triton.jit
def _gather_dot_kernel(latents, token_rows, table, out, K, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    token, ks = tl.program_id(0), tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    rows = tl.load(latents + token * K + ks, mask=k_ok, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        r = tl.load(token_rows + token.to(tl.int64) * D + cols, mask=col_ok, other=0.0).to(tl.float32)
        tile = tl.load(table + rows[:, None] * D + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(tile.to(tl.float32) * r[None, :], axis=1)
    tl.store(out + token * K + ks, acc, mask=k_ok)


@triton.jit
def _scatter_sum_kernel(sorted_latents, pair_tokens, pair_weights, token_rows, out, n_pairs, D,
                        PAIRS: tl.constexpr, BLOCK_D: tl.constexpr):
    first, cols = tl.program_id(0) * PAIRS, tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(PAIRS):
        p = first + i
        valid = p < n_pairs
        latent = tl.load(sorted_latents + p, mask=valid, other=-1)
        next_latent = tl.load(sorted_latents + p + 1, mask=(p + 1 < n_pairs) & (i + 1 < PAIRS), other=-1)
        token = tl.load(pair_tokens + p, mask=valid, other=0)
        w = tl.load(pair_weights + p, mask=valid, other=0.0).to(tl.float32)
        # (tl.where, not `col_ok & valid`: Triton's interpreter mistypes a vector & scalar mask)
        r = tl.load(token_rows + token * D + cols, mask=tl.where(valid, col_ok, False), other=0.0).to(tl.float32)
        acc += w * r
        run_ends = valid & (latent != next_latent)  # the next pair is another latent's, or not this program's
        tl.atomic_add(out + latent * D + cols, acc, mask=tl.where(run_ends, col_ok, False))
        acc = tl.where(run_ends, 0.0, acc)


def gather_sum(latents, weights, table):
    """[tokens, D]: sum_j weights[:, j] * table[latents[:, j]]."""
    (B, K), D = latents.shape, table.shape[1]
    out = torch.empty(B, D, dtype=torch.float32, device=table.device)
    _gather_sum_kernel[(B, triton.cdiv(D, BLOCK_D))](latents, weights, table, out, K, D,
                                                     BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D)
    return out


def gather_dot(latents, token_rows, table):
    """[tokens, k]: token_rows[t] . table[latents[t, j]]."""
    B, K = latents.shape
    out = torch.empty(B, K, dtype=torch.float32, device=table.device)
    _gather_dot_kernel[(B, triton.cdiv(K, BLOCK_K))](latents, token_rows, table, out, K, table.shape[1],
                                                     BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D)
    return out


def scatter_sum(latents, weights, token_rows, n_latents):
    """[n_latents, D]: row l sums weights[t, j] * token_rows[t] over the pairs with latents[t, j] = l."""
    K, D = latents.shape[1], token_rows.shape[1]
    sorted_latents, order = latents.flatten().sort()
    out = torch.zeros(n_latents, D, dtype=torch.float32, device=token_rows.device)
    n_pairs = sorted_latents.numel()
    grid = (triton.cdiv(n_pairs, PAIRS_PER_PROGRAM), triton.cdiv(D, BLOCK_D))
    _scatter_sum_kernel[grid](sorted_latents, order // K, weights.flatten()[order].contiguous(), token_rows, out,
                              n_pairs, D, PAIRS=PAIRS_PER_PROGRAM, BLOCK_D=BLOCK_D)
    return out


class SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, latents, table, weights):
        ctx.save_for_backward(latents, table, weights)
        return gather_sum(latents, weights, table)

    @staticmethod
    def backward(ctx, grad_out):
        latents, table, weights = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_table = scatter_sum(latents, weights, grad_out, table.shape[0]) if ctx.needs_input_grad[1] else None
        grad_weights = gather_dot(latents, grad_out, table) if ctx.needs_input_grad[2] else None
        return None, grad_table, grad_weights


def sparse_decode(latents: torch.Tensor, table: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """float32 table [d_sae, d_in], weights [tokens, k]: what F.embedding_bag(latents, table,
    per_sample_weights=weights, mode="sum") computes, forward and backward."""
    if table.dtype != torch.float32 or weights.dtype != torch.float32:
        raise TypeError(f"the sparse decoder takes float32, not {table.dtype} and {weights.dtype}")
    return SparseDecode.apply(latents.contiguous(), table.contiguous(), weights.contiguous())


class SparseTopKEncode(torch.autograd.Function):
    """The top k of x @ W_enc + b_enc per token, whose backward touches only those k latents."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, dtype):
        # On a GPU the faster of the fused kernel and cuBLAS + torch.topk, as timed there; the
        # interpreter (tests, on CPU) runs the fused kernel.
        top_k = triton_encode.fastest_forward if x.is_cuda else triton_encode.fused_topk
        values, latents = top_k(x.to(dtype), W_enc.to(dtype), b_enc, k)
        ctx.save_for_backward(x, W_enc, latents)
        ctx.mark_non_differentiable(latents)
        return values, latents

    @staticmethod
    def backward(ctx, grad_values, _):
        x, W_enc, latents = ctx.saved_tensors
        g = grad_values.float().contiguous()
        grad_x = gather_sum(latents, g, W_enc.t().float().contiguous()) if ctx.needs_input_grad[0] else None
        grad_W = scatter_sum(latents, g, x.float().contiguous(), W_enc.shape[1]).t() if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros(W_enc.shape[1], device=g.device).index_add_(0, latents.flatten(), g.flatten())
        return grad_x, grad_W, grad_b if ctx.needs_input_grad[2] else None, None, None


def sparse_topk_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, dtype: torch.dtype):
    """(float32 values, latents) of the k largest pre-activations of each row of x (float32
    [tokens, d_in]); the product runs in `dtype` (sae/triton_encode.py), the backward in float32."""
    return SparseTopKEncode.apply(x, W_enc, b_enc, k, dtype)
