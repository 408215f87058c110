"""The TopK encoder's forward as one Triton kernel: x @ W_enc + b_enc and the top k of each row,
without writing the [tokens, d_sae] pre-activations to memory.

At DeepSeek-V4-Flash width (65,536 latents, batch 4096) the pre-activations are 512 MiB in bf16,
written by the matmul and read back by torch.topk. Here each program computes one tile of them,
[BLOCK_M tokens, BLOCK_N latents], in registers and keeps only its top C per token; a top k over
those candidates (d_sae / BLOCK_N * C per token, 16-32 times fewer at Flash width) finishes the job.

This is exact. A tile can only lose one of a token's true top k if all C of its candidates made the
final top k; those tokens (with C = 8 and k=64 of 65,536 latents, one in 10^7 or fewer) are run
again keeping min(k, BLOCK_N) candidates a tile, which no tile can overflow. A candidate is one int64
that sorts as its value: the float32's bits, made order-preserving, in the high half and the latent's
index in the low half. The bias and the values are rounded to the inputs' dtype, as cuBLAS rounds them.

Which is faster on a given GPU, this or cuBLAS plus torch.topk, is measured rather than assumed:
`fastest_forward` checks each fused tile shape's answer against cuBLAS's and times them all on the
first batch of each shape (a tile that fails to compile, to fit or to agree is left out).
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

log = logging.getLogger(__name__)

BLOCK_D = 64  # inputs per step of the matmul
# (tokens, latents, warps) of a tile tried on CUDA; each thread holds 64 products, as float32 and then
# as int64 candidates, which keeps within its registers
TILE_SHAPES = ((64, 128, 4), (128, 128, 8), (64, 256, 8))
TAKEN = tl.constexpr(-(2**63))  # below every packed value, -inf's included


@triton.jit
def _tile_candidates_kernel(x, w, bias, out, M, N, D, TILES, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, C: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tile = tl.program_id(1)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        a = tl.load(x + rows[:, None].to(tl.int64) * D + ds[None, :], mask=row_ok[:, None] & (ds[None, :] < D), other=0.0)
        b = tl.load(w + ds[:, None].to(tl.int64) * N + cols[None, :], mask=(ds[:, None] < D) & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    acc += tl.load(bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc = tl.where(col_ok[None, :], acc, float("-inf"))
    # float32 bits as an int32 that orders like the float: negative floats have their other bits flipped
    bits = acc.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    packed = (key.to(tl.int64) << 32) | cols[None, :].to(tl.int64)
    # C rounds of "take each row's largest, then rule it out" (packed values are distinct: the index is
    # in them). Cheaper than tl.topk's bitonic sort for small C, and far cheaper in the interpreter.
    first = out + (rows.to(tl.int64) * TILES + tile) * C
    for slot in range(C):
        best = tl.max(packed, axis=1)
        tl.store(first + slot, best, mask=row_ok)
        packed = tl.where(packed == best[:, None], TAKEN, packed)


def candidates_per_tile(k: int, n: int, block_n: int) -> int:
    """C: room for 4x a tile's expected share of the top k, at least 8, and enough in all for k."""
    return min(block_n, max(8, 4 * k * block_n // n, triton.cdiv(k, triton.cdiv(n, block_n))))


def unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 values, int64 latents) of packed candidates."""
    key = (packed >> 32).to(torch.int32)
    bits = torch.where(key >= 0, key, key ^ 0x7FFFFFFF)
    return bits.view(torch.float32), packed & 0xFFFFFFFF


def fused_topk(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int, tile: tuple = TILE_SHAPES[0],
               c: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 values, latents) of the k largest entries of each row of x @ W + b, in no set order.

    x [tokens, d_in] and W [d_in, d_sae] in one dtype (float32 products are exact, not tf32); b is rounded
    to it and so are the values, as cuBLAS's addmm in that dtype rounds them.
    `c` overrides the candidates kept per tile (tests use it to force the recomputation)."""
    (M, D), N = x.shape, W.shape[1]
    if W.shape[0] != D or b.shape != (N,):
        raise ValueError(f"x {tuple(x.shape)}, W {tuple(W.shape)} and b {tuple(b.shape)} do not make x @ W + b")
    x, W, b = x.contiguous(), W.contiguous(), b.to(x.dtype).contiguous()
    block_m, block_n, warps = tile
    tiles, C = triton.cdiv(N, block_n), c or candidates_per_tile(k, N, block_n)
    packed = torch.empty(M, tiles * C, dtype=torch.int64, device=x.device)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # (tf32 is ignored for 16-bit inputs)
    _tile_candidates_kernel[(triton.cdiv(M, block_m), tiles)](
        x, W, b, packed, M, N, D, tiles, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=BLOCK_D, C=C,
        PRECISION=precision, num_warps=warps)
    best, pos = packed.topk(k, dim=-1, sorted=False)
    values, latents = unpack(best)
    whole = min(k, block_n)  # candidates a tile can never overflow: all of its top k, or all of it
    if C < whole:
        # A tile all of whose C candidates were chosen may have held more of the top k: those tokens again,
        # keeping every candidate that can count.
        per_tile = torch.zeros(M, tiles, dtype=torch.int32, device=x.device)
        per_tile.scatter_add_(1, pos // C, torch.ones_like(pos, dtype=torch.int32))
        redo = (per_tile >= C).any(dim=1).nonzero().squeeze(1)
        if redo.numel():
            values[redo], latents[redo] = fused_topk(x[redo], W, b, k, tile, c=whole)
    return values.to(x.dtype).float(), latents


def addmm_topk(x, W, b, k):
    """The same with cuBLAS and torch.topk: the [tokens, d_sae] pre-activations are written and read back."""
    values, latents = torch.addmm(b.to(x.dtype), x, W).topk(k, dim=-1, sorted=False)
    return values.float(), latents


BASELINE = "cuBLAS addmm + torch.topk"
_fastest: dict[tuple, str] = {}  # the name of the fastest way for each shape, dtype and device


def forwards() -> dict:
    fused = {f"fused, {m} tokens x {n} latents a tile, {w} warps":
             (lambda x, W, b, k, tile=(m, n, w): fused_topk(x, W, b, k, tile)) for m, n, w in TILE_SHAPES}
    return {BASELINE: addmm_topk, **fused}


def fastest_forward(x, W, b, k) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder forward that timed fastest for this shape on this GPU (timed once per shape)."""
    ways = forwards()
    key = (tuple(x.shape), tuple(W.shape), k, x.dtype, x.device)
    if key not in _fastest:
        times = time_forwards(x, W, b, k)
        _fastest[key] = min(times, key=times.get)
        log.info("encoder forward for %s: %s (%s)", key[:3], _fastest[key],
                 ", ".join(f"{name} {ms:.2f} ms" for name, ms in times.items()))
    return ways[_fastest[key]](x, W, b, k)


def time_forwards(x, W, b, k) -> dict[str, float]:
    """Milliseconds of each way that gives this shape's answer here. A fused tile is left out, with a
    warning, where it does not compile or fit on this GPU (its shared memory or registers) or where its
    top k differs from cuBLAS's; cuBLAS + torch.topk always remains."""
    pre = torch.addmm(b.to(x.dtype), x, W).float()
    expected = pre.topk(k, dim=-1).values
    times = {}
    for name, forward in forwards().items():
        try:
            values, latents = forward(x, W, b, k)
            if not agrees(values, latents, pre, expected):
                raise ArithmeticError("its top k differs from cuBLAS's")
            times[name] = triton.testing.do_bench(lambda f=forward: f(x, W, b, k), warmup=5, rep=20)
        except Exception as e:  # noqa: BLE001  (triton raises compile and resource errors of many kinds)
            if name == BASELINE:
                raise
            log.warning("encoder forward %s left out: %s", name, str(e).splitlines()[0] if str(e) else type(e).__name__)
    return times


def agrees(values, latents, pre, expected) -> bool:
    """The values are the pre-activations at their latents, and as large as the top k (bf16's rounding apart)."""
    close = dict(rtol=2e-2, atol=2e-2)
    return (torch.allclose(pre.gather(1, latents), values, **close)
            and torch.allclose(values.sort(dim=-1, descending=True).values, expected, **close))
