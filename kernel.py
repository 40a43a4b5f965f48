"""
Triton kernels for SEA's fast path at inference (steps 5 to 7 of sea.py): one kernel picks
the kept bins of every row, another runs the sparse attention over them on tensor cores. Between
them nothing goes back to the host: sizes are known from T alone, so a whole SEA call can be
captured in a CUDA graph. sea.py holds the readable PyTorch versions they are tested against.

1. select_bins: step 5, the grouped top-k of each row, one program per (batch, query row)

    load the row's H x T_M probabilities p (a 2-D tile)     empty bins of short rows rank last
    rank key = (bits of p) << log2(H T_M) | (H T_M - 1 - cell)  unique; larger p first, then lower cell
    bisect for the n_i-th largest key t                     n_i = the row's budget
    keep = key >= t                                         exactly n_i cells, ties to the lower cell

2. sparse_attention_blocks: step 7, one program per (batch, head, block of BLOCK_M query rows)

    for every bin c kept by any row of the block          (a bitmask OR over the block's rows)
      keys [start, end) that bin c covers for some row     bins are fractions of a row, so bin c
        in tiles of BLOCK_N keys                           moves little across neighbouring rows
          scores = q k^T on tensor cores (tl.dot)
          mask: key j is in bin c of row i, row i kept c, and j <= i
          online softmax (running max m, sum l), acc += p v
    out = acc / l                                          zeros where a row kept no bin

Both run under the Triton interpreter (TRITON_INTERPRET=1) on a CPU, which is how the tests check
them against sea.grouped_topk and sea.sparse_attention.
"""

import os

import torch
import triton
import triton.language as tl

SUPPORTED_HEAD_DIMS = (32, 64, 128)


@triton.jit
def bin_start(c, i, T_M):
    """The first key of bin c of row i (sea.bin_edges, the one formula): bin c holds keys [bin_start(c),
    bin_start(c + 1))."""
    return (2 * c * (i + 1) + T_M - 1) // (2 * T_M)


# -----------------------------------------------------------------------------
# step 5: the grouped top-k of each row

@triton.jit
def select_bins_kernel(
    P, Keep, Budget,  # P: (B, H, R, T_M) float32 probabilities; Keep: (B, H, R, T_M) int8; Budget: (R,) int64
    H, R, row0, T_M,  # heads, rows in this launch, first row's position, bins per row
    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, INDEX_BITS: tl.constexpr,
):
    program = tl.program_id(0)  # = b * R + row
    b, row = program // R, program % R
    i = row0 + row  # the query position: keys 0..i
    h = tl.arange(0, BLOCK_H)[:, None]
    c = tl.arange(0, BLOCK_C)[None, :]
    valid = (h < H) & (c < T_M)
    offsets = ((b * H + h) * R + row) * T_M + c  # (BLOCK_H, BLOCK_C)
    p = tl.load(P + offsets, mask=valid, other=0.0)
    # a bin holds keys [start, end); short rows have empty bins, which rank below every real one
    start, end = bin_start(c, i, T_M), bin_start(c + 1, i, T_M)
    value = tl.where(end > start, p.to(tl.int32, bitcast=True).to(tl.int64) + 1, 0)  # p >= 0: bits order like p
    cell = h * T_M + c
    key = tl.where(valid, (value << INDEX_BITS) | ((1 << INDEX_BITS) - 1 - cell), -1)
    # bisect for the largest t with at least n keys >= t: the n-th largest key
    n = tl.load(Budget + row)
    lo = tl.zeros([], tl.int64)  # count(key >= lo) >= n always holds
    hi = tl.full([], 1, tl.int64) << (32 + INDEX_BITS)  # count(key >= hi) = 0 < n
    for _ in range(32 + INDEX_BITS):  # halves hi - lo each time: ends with hi = lo + 1
        mid = (lo + hi) // 2
        enough = tl.sum((key >= mid).to(tl.int32)) >= n
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    tl.store(Keep + offsets, (key >= lo).to(tl.int8), mask=valid)


def select_bins(p_hat, row0, budget):
    """sea.grouped_topk for the rows row0 .. row0 + R - 1, with their budget (R,) given (it is known
    from the positions alone): p_hat (B, H, R, T_M) -> keep (B, H, R, T_M) bool."""
    B, H, R, T_M = p_hat.shape
    keep = torch.empty(B, H, R, T_M, dtype=torch.int8, device=p_hat.device)
    index_bits = max(1, (H * T_M - 1).bit_length())
    select_bins_kernel[(B * R,)](p_hat.float().contiguous(), keep, budget.contiguous(), H, R, row0, T_M,
                                 BLOCK_H=triton.next_power_of_2(H), BLOCK_C=triton.next_power_of_2(T_M),
                                 INDEX_BITS=index_bits)
    return keep.bool()


# -----------------------------------------------------------------------------
# step 7: sparse attention over the kept bins, a block of query rows at a time

@triton.jit
def sparse_attention_blocks_kernel(
    Q, K, V, Out,  # Q, Out: (B, H, R, D) the launch's query rows, contiguous; K, V: (B, H_kv, T, D), rows contiguous
    Keep, Union,  # Keep: (B, H, R, T_M) int8 kept bins; Union: (B, H, n_blocks, T_M) int8, kept by any row of a block
    stride_kb, stride_kh, stride_vb, stride_vh,  # K's and V's strides over batch and head (a cache is a slice)
    H, G, R, row0, T_M, n_blocks,  # query heads, query heads per key/value head, ...
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # multiply in float32 (the interpreter gets bfloat16 tl.dot wrong)
):
    block, bh = tl.program_id(0), tl.program_id(1)  # bh = b * H + h
    K += (bh // H) * stride_kb + (bh % H) // G * stride_kh  # key/value head h // G of batch b
    V += (bh // H) * stride_vb + (bh % H) // G * stride_vh
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of this launch
    row_valid = rows < R
    i = row0 + rows  # their positions
    d = tl.arange(0, D)
    q = tl.load(Q + (bh * R + rows[:, None]) * D + d[None, :], mask=row_valid[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of each row's scores
    l = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp(score - m)
    acc = tl.zeros([BLOCK_M, D], tl.float32)  # running sum of exp(score - m) * v
    block_first, block_last = row0 + block * BLOCK_M, row0 + tl.minimum(block * BLOCK_M + BLOCK_M, R) - 1
    for c in range(0, T_M):
        if tl.load(Union + (bh * n_blocks + block) * T_M + c) != 0:
            kept = tl.load(Keep + (bh * R + rows) * T_M + c, mask=row_valid, other=0) != 0  # (BLOCK_M,)
            start = bin_start(c, block_first, T_M)  # bin edges grow with the row
            end = bin_start(c + 1, block_last, T_M)
            row_start, row_end = bin_start(c, i, T_M), bin_start(c + 1, i, T_M)  # (BLOCK_M,) each row's bin c
            for n in range(start, end, BLOCK_N):
                j = n + tl.arange(0, BLOCK_N)
                k = tl.load(K + j[:, None] * D + d[None, :], mask=(j < end)[:, None], other=0.0)
                v = tl.load(V + j[:, None] * D + d[None, :], mask=(j < end)[:, None], other=0.0)
                if UPCAST:
                    k, v = k.to(tl.float32), v.to(tl.float32)
                scores = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32)  # (BLOCK_M, BLOCK_N)
                in_bin = (j[None, :] >= row_start[:, None]) & (j[None, :] < row_end[:, None])
                visible = in_bin & kept[:, None] & (j[None, :] <= i[:, None]) & (j[None, :] < end)
                scores = tl.where(visible, scores, float("-inf"))
                m_new = tl.maximum(m, tl.max(scores, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
                rescale = tl.exp(m - m_safe)
                p = tl.exp(scores - m_safe[:, None])
                l = l * rescale + tl.sum(p, axis=1)
                acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
                m = m_new
    out = acc / tl.maximum(l, 1e-30)[:, None]  # l = 0 only when the row kept nothing: acc is 0 too
    tl.store(Out + (bh * R + rows[:, None]) * D + d[None, :], out, mask=row_valid[:, None])


def sparse_attention_blocks(q, k, v, keep, row0, block_m=64, block_n=64):
    """Same contract as sea.sparse_attention: q (B, H, R, D) rows row0 .. row0 + R - 1, k, v
    (B, H_kv, T, D) fp32/fp16/bf16 (read in place: a cache's slice is not copied), keep (B, H, R, T_M)
    bool. Returns (B, H, R, D) float32."""
    B, H, R, D = q.shape
    T_M = keep.size(-1)
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"the Triton SEA kernels support head dims {SUPPORTED_HEAD_DIMS}, got {D}; "
                         f"use SEAConfig(use_kernel=False)")
    n_blocks = triton.cdiv(R, block_m)
    padded = torch.nn.functional.pad(keep, (0, 0, 0, n_blocks * block_m - R))
    union = padded.view(B, H, n_blocks, block_m, T_M).any(dim=3)  # (B, H, n_blocks, T_M)
    out = torch.empty(B, H, R, D, dtype=torch.float32, device=q.device)
    q = q.contiguous()
    k, v = (t if t.stride(-1) == 1 and t.stride(-2) == D else t.contiguous() for t in (k, v))
    upcast = q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    sparse_attention_blocks_kernel[(n_blocks, B * H)](
        q, k, v, out, keep.to(torch.int8).contiguous(), union.to(torch.int8).contiguous(),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), H, H // k.size(1), R, row0, T_M, n_blocks,
        D=D, BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32", UPCAST=upcast)  # fp32 stays exact
    return out
