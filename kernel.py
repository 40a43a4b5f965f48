"""
A fused Triton kernel for SEA's sparse attention (step 7 of ../shared/SEA.md).

The kept keys of a query row are the union of a few kept bins, and each bin is a
contiguous key range, so the kernel never sees a T x T tensor or a per-key list:

    program (b, h, row) of the grid          one query vector q = Q[b, h, row0 + row]
      for every kept bin c of (b, h, row)    read from a CSR list: Bins[Indptr[p] : Indptr[p + 1]]
        keys [start(c), end(c))              computed from c, the row and M, as in sea.bin_edges
          in blocks of BLOCK_N keys          scores q . k, online softmax (running max m and sum l),
                                             acc = sum of p * v, all in float32
      Out[b, h, row] = acc / l               (zeros when the head kept no bin in this row)

Used by SEAAttention on CUDA at inference (SEAConfig.use_kernel); on a CPU it runs under
the Triton interpreter (TRITON_INTERPRET=1), which is how the tests check it against
sea.sparse_attention.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def sea_sparse_attention_kernel(
    Q, K, V, Out,  # Q, K, V: (B, H, T, D) contiguous; Out: (B, H, R, D) contiguous
    Indptr, Bins,  # CSR over programs: the kept bins of program p are Bins[Indptr[p]:Indptr[p + 1]]
    H, T, R, row0, M,  # heads, keys, query rows in this launch, first row's position, bins per row
    D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    program = tl.program_id(0)  # = (b * H + h) * R + row
    row = program % R
    bh = program // R  # = b * H + h: (b, h) slices of Q, K, V start at bh * T * D
    i = row0 + row  # the query position: keys 0..i are visible
    offs_d = tl.arange(0, D)
    q = tl.load(Q + (bh * T + i) * D + offs_d).to(tl.float32)

    m = tl.full([], float("-inf"), tl.float32)  # running max of the scores
    l = tl.zeros([], tl.float32)  # running sum of exp(score - m)
    acc = tl.zeros([D], tl.float32)  # running sum of exp(score - m) * v
    first, last = tl.load(Indptr + program), tl.load(Indptr + program + 1)
    for cell in range(first, last):
        c = tl.load(Bins + cell)
        start = (2 * c * (i + 1) + M - 1) // (2 * M)  # bin c holds keys [start, end)
        end = (2 * (c + 1) * (i + 1) + M - 1) // (2 * M)
        for n in range(start, end, BLOCK_N):
            offs_n = n + tl.arange(0, BLOCK_N)
            valid = offs_n < end
            kv_offsets = (bh * T + offs_n[:, None]) * D + offs_d[None, :]  # (BLOCK_N, D)
            k = tl.load(K + kv_offsets, mask=valid[:, None], other=0.0).to(tl.float32)
            v = tl.load(V + kv_offsets, mask=valid[:, None], other=0.0).to(tl.float32)
            scores = tl.where(valid, tl.sum(k * q[None, :], axis=1), float("-inf"))  # (BLOCK_N,)
            m_new = tl.maximum(m, tl.max(scores, axis=0))
            rescale = tl.exp(m - m_new)
            p = tl.exp(scores - m_new)
            l = l * rescale + tl.sum(p, axis=0)
            acc = acc * rescale + tl.sum(p[:, None] * v, axis=0)
            m = m_new
    out = acc / tl.maximum(l, 1e-30)  # l = 0 only when no bin was kept: acc is 0 then too
    tl.store(Out + program * D + offs_d, out.to(Out.dtype.element_ty))


SUPPORTED_HEAD_DIMS = (32, 64, 128)


def sparse_attention_triton(q, k, v, keep, row0, block_n=32):
    """Same contract as sea.sparse_attention: rows row0 .. row0 + R - 1 over their kept bins.

    q, k, v (B, H, T, D) fp32/fp16/bf16; keep (B, H, R, M) bool. Returns (B, H, R, D) float32.
    """
    B, H, T, D = q.shape
    R, M = keep.shape[2], keep.shape[3]
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"the Triton SEA kernel supports head dims {SUPPORTED_HEAD_DIMS}, got {D}; "
                         f"use SEAConfig(use_kernel=False)")
    q, k, v = (t.contiguous() for t in (q, k, v))
    counts = keep.sum(-1).flatten()  # kept bins of each (b, h, row), in program order
    indptr = torch.zeros(B * H * R + 1, dtype=torch.int32, device=q.device)
    indptr[1:] = counts.cumsum(0)
    bins = keep.nonzero()[:, 3].to(torch.int32)  # row-major order matches the program order
    out = torch.empty(B, H, R, D, dtype=torch.float32, device=q.device)
    sea_sparse_attention_kernel[(B * H * R,)](q, k, v, out, indptr, bins, H, T, R, row0, M,
                                              D=D, BLOCK_N=block_n)
    return out
