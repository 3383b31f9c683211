"""A product of few rows by a large weight, the shape of every linear in a decode step at small batch, as
one Triton kernel that reads the weight once at close to the memory's bandwidth.

At 8 rows cuBLAS tiles such a product by output features alone: a 2048 x 2048 weight gives 32 tiles, so a
quarter of an H200's 132 processors read it (benchmarks/results/decode_kernels_gpu.json: 1.6 TB/s of 4.8).
Here the reduction over K is split as well (`splits`), so that every processor streams its share; each split
writes its fp32 partial sums, and the caller adds them (`sum(0)`, which inductor folds into the product's
consumer). The rows are padded to the tensor cores' smallest tile, which costs no memory traffic: the
weight is what is read.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the pass that uses the op is not applied (`available`)
    triton = None

ROWS = 16  # the most rows the kernel serves (tl.dot's smallest tile)
HALF = (torch.bfloat16, torch.float16)

if triton is not None:
    @triton.jit
    def _partials(x_ptr, w_ptr, out_ptr, rows, n, k, stride_x, stride_w,
                  STEPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr):
        """out[s, r, j] = sum over the s-th STEPS * BLOCK_K of k of x[r, k] * w[j, k]."""
        split = tl.program_id(1)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, ROWS)
        acc = tl.zeros((BLOCK_N, ROWS), dtype=tl.float32)
        for step in range(STEPS):  # the last split's tail is masked
            ks = (split * STEPS + step) * BLOCK_K + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=(cols[:, None] < n) & (ks[None, :] < k),
                        other=0.0)
            x = tl.load(x_ptr + r[None, :] * stride_x + ks[:, None], mask=(r[None, :] < rows) & (ks[:, None] < k),
                        other=0.0)
            acc += tl.dot(w, x)
        tl.store(out_ptr + split * rows * n + r[None, :] * n + cols[:, None], acc,
                 mask=(cols[:, None] < n) & (r[None, :] < rows))


BLOCK_K, WARPS, STAGES = 128, 4, 4


def available(device: torch.device | str) -> bool:
    """Whether the kernel can run on `device`: Triton is importable and the device is a CUDA GPU."""
    return triton is not None and torch.device(device).type == "cuda"


def processors(device: torch.device | str) -> int:
    return torch.cuda.get_device_properties(torch.device(device)).multi_processor_count


def plan(n: int, k: int, processors: int) -> tuple[int, int]:
    """(BLOCK_N, splits) for an (n, k) weight: narrow tiles for narrow weights; then the reduction split in
    two while the programs fit two to a processor and each split keeps a BLOCK_K of k. On an H200 this is
    within 20% of the best of 18 configs and 5 splits at each of generate_scale.py's shapes
    (benchmarks/results/skinny_linear_gpu.json)."""
    block_n = 32 if n <= 1024 else 128 if n >= 8192 else 64
    tiles, s = -(-n // block_n), 1
    while tiles * s * 2 <= 2 * processors and k // (s * 2) >= BLOCK_K:
        s *= 2
    return block_n, s


def launch(x: torch.Tensor, w: torch.Tensor, block_n: int, splits: int, kernel=None, block_k: int = BLOCK_K,
           warps: int = WARPS, stages: int = STAGES) -> torch.Tensor:
    """(splits, rows, n) fp32 partial sums of `x @ w.T` (x: (rows, k), rows <= ROWS; w: (n, k); each with k
    contiguous). `kernel`: the kernel as launched (torch.library.wrap_triton's, in the op)."""
    rows, k = x.shape
    n = w.shape[0]
    out = torch.empty((splits, rows, n), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(n, block_n), splits)
    (kernel or _partials)[grid](x, w, out, rows, n, k, x.stride(0), w.stride(0), STEPS=-(-k // (splits * block_k)),
                                BLOCK_N=block_n, BLOCK_K=block_k, ROWS=ROWS, num_warps=warps, num_stages=stages)
    return out


if triton is not None:
    @torch.library.triton_op("calmgraph::skinny_partials", mutates_args=())
    def skinny_partials(x: torch.Tensor, w: torch.Tensor, block_n: int, splits: int) -> torch.Tensor:
        """`launch` as an operator torch.compile sees into: inductor schedules its kernel, captures it in the
        step's CUDA graph, and folds the sum of the partials into what reads the product."""
        return launch(x, w, block_n, splits, kernel=torch.library.wrap_triton(_partials))


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, processors: int) -> torch.Tensor:
    """`F.linear(x, w, bias)`, as `skinny_partials` summed where x has at most ROWS rows and w is a
    half-precision CUDA matrix (x cast to w's dtype, as autocast would). torch.compile decides when it
    traces, on the shapes it compiles for: a decode step's rows."""
    k = w.shape[1]
    rows = x.numel() // k
    if not (available(w.device) and w.dtype in HALF and 0 < rows <= ROWS):
        return F.linear(x, w, bias)
    block_n, splits = plan(w.shape[0], k, processors)
    partials = torch.ops.calmgraph.skinny_partials(x.reshape(rows, k).to(w.dtype).contiguous(), w, block_n, splits)
    out = partials.sum(0).to(w.dtype).reshape(*x.shape[:-1], w.shape[0])
    return out if bias is None else out + bias
