"""The TopK decoder as Triton kernels: out[b] = sum_j weights[b, j] * W[indices[b, j]], forward and backward.

An SAE with k active latents per token needs only k rows of the decoder per token; these kernels
gather exactly those rows, and never build a dense [batch, d_sae] matrix in either direction:
- forward: one program per (token, block of d_in) sums its k weighted rows;
- grad of the weights: the same gather, each row dotted with the token's output gradient;
- grad of W: the (token, latent) pairs sorted by latent, so that each program walks a run of
  pairs, sums weight x output gradient while the latent stays the same, and adds the sum into
  that latent's row once (an atomic add only where a run ends or the program's share does).
Accumulation is in float32. Used on CUDA by sae/step.py; under TRITON_INTERPRET=1 the same
kernels run on CPU tensors, which is how the tests check them against torch's embedding_bag.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_D = 128  # d_in columns per program
BLOCK_K = 16  # active latents loaded at once
PAIRS_PER_PROGRAM = 64  # sorted (token, latent) pairs one W-gradient program walks


@triton.jit
def _decode_kernel(indices, weights, table, out, K, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    token, cols = tl.program_id(0), tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        rows = tl.load(indices + token * K + ks, mask=k_ok, other=0).to(tl.int64)
        w = tl.load(weights + token * K + ks, mask=k_ok, other=0.0).to(tl.float32)
        tile = tl.load(table + rows[:, None] * D + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(tile.to(tl.float32) * w[:, None], axis=0)
    tl.store(out + token.to(tl.int64) * D + cols, acc, mask=col_ok)


@triton.jit
def _weights_grad_kernel(indices, grad_out, table, grad_weights, K, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    token, ks = tl.program_id(0), tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    rows = tl.load(indices + token * K + ks, mask=k_ok, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        g = tl.load(grad_out + token.to(tl.int64) * D + cols, mask=col_ok, other=0.0).to(tl.float32)
        tile = tl.load(table + rows[:, None] * D + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(tile.to(tl.float32) * g[None, :], axis=1)
    tl.store(grad_weights + token * K + ks, acc, mask=k_ok)


@triton.jit
def _table_grad_kernel(sorted_rows, pair_tokens, pair_weights, grad_out, grad_table, n_pairs, D,
                       PAIRS: tl.constexpr, BLOCK_D: tl.constexpr):
    first, cols = tl.program_id(0) * PAIRS, tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(PAIRS):
        p = first + i
        valid = p < n_pairs
        row = tl.load(sorted_rows + p, mask=valid, other=-1)
        next_row = tl.load(sorted_rows + p + 1, mask=(p + 1 < n_pairs) & (i + 1 < PAIRS), other=-1)
        token = tl.load(pair_tokens + p, mask=valid, other=0)
        w = tl.load(pair_weights + p, mask=valid, other=0.0).to(tl.float32)
        # (tl.where, not `col_ok & valid`: Triton's interpreter mistypes a vector & scalar mask)
        g = tl.load(grad_out + token * D + cols, mask=tl.where(valid, col_ok, False), other=0.0).to(tl.float32)
        acc += w * g
        run_ends = valid & (row != next_row)  # the next pair is another latent's, or not this program's
        tl.atomic_add(grad_table + row * D + cols, acc, mask=tl.where(run_ends, col_ok, False))
        acc = tl.where(run_ends, 0.0, acc)


def _decode(indices, weights, table):
    (B, K), D = indices.shape, table.shape[1]
    out = torch.empty(B, D, dtype=table.dtype, device=table.device)
    _decode_kernel[(B, triton.cdiv(D, BLOCK_D))](indices, weights, table, out, K, D, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D)
    return out


def _weights_grad(indices, grad_out, table):
    B, K = indices.shape
    grad = torch.empty(B, K, dtype=table.dtype, device=table.device)
    _weights_grad_kernel[(B, triton.cdiv(K, BLOCK_K))](indices, grad_out, table, grad, K, table.shape[1],
                                                      BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D)
    return grad


def _table_grad(indices, weights, grad_out, table):
    K, D = indices.shape[1], table.shape[1]
    sorted_rows, order = indices.flatten().sort()
    grad = torch.zeros_like(table)
    n_pairs = sorted_rows.numel()
    grid = (triton.cdiv(n_pairs, PAIRS_PER_PROGRAM), triton.cdiv(D, BLOCK_D))
    _table_grad_kernel[grid](sorted_rows, order // K, weights.flatten()[order].contiguous(), grad_out, grad,
                             n_pairs, D, PAIRS=PAIRS_PER_PROGRAM, BLOCK_D=BLOCK_D)
    return grad


class SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices, table, weights):
        indices, weights = indices.contiguous(), weights.contiguous()
        ctx.save_for_backward(indices, table, weights)
        return _decode(indices, weights, table)

    @staticmethod
    def backward(ctx, grad_out):
        indices, table, weights = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_table = _table_grad(indices, weights, grad_out, table) if ctx.needs_input_grad[1] else None
        grad_weights = _weights_grad(indices, grad_out, table) if ctx.needs_input_grad[2] else None
        return None, grad_table, grad_weights


def sparse_decode(indices: torch.Tensor, table: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_j weights[:, j] * table[indices[:, j]]: F.embedding_bag(indices, table, per_sample_weights=weights,
    mode="sum") for a contiguous table, on the GPU (or the Triton interpreter)."""
    if weights.dtype != table.dtype:
        raise TypeError(f"weights are {weights.dtype}, the decoder {table.dtype}: cast one to the other")
    return SparseDecode.apply(indices, table.contiguous(), weights)
