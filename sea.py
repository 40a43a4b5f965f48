"""
SEA: Sparse linear attention with an Estimated Attention mask (Lee et al., ICLR 2024).

Every query's attention row is first *estimated* cheaply, in a compressed form of
T_M bins (the predictor length), then a few bins are kept and exact softmax attention runs on their
keys only. This file follows the paper's steps, each under its heading, in order:

  1. linear estimate   causal FAVOR+ (ReLU kernel) over [positions, values]
  2. encode            e = GELU(LayerNorm(Linear(concat(c, v))))
  3. decode            a small causal CNN turns e into compressed scores s_hat (ours, beyond the
                       paper: SEAConfig.estimator = "residual" adds it to an estimate from the keys)
  4. probabilities     p_hat = softmax(s_hat) over the T_M bins
  5. grouped top-k     keep the best bins of all heads together, a budget per row: KeptBins
  6. decompress        kept bins -> key ranges, a flat list of (batch, head, row, keys): KeyRanges
  7. sparse attention  exact softmax over the kept keys, times a gate
  8. mix               with the running mean of the values, by a second gate

then the layer that runs them (GatedSparseAttention.attend_chunk, one chunk of rows at a time, each
chunk handing the next the state it needs, the same state that decoding one token at a time keeps),
and what training needs (the teacher's attention, the estimate loss). The choice of keys (steps 3-5)
is the one thing SEA and its controls (controls.py) do differently. At inference nothing here is
T x T; training runs step 7 as a masked dense softmax, as the distillation loss is T x T anyway.

Shapes: B batch, H query heads, H_kv key/value heads, T keys, D head dim, T_M bins, R query rows of a
chunk. Names: `rows` are the positions of a chunk's query rows, `row0` the first of them;
SEAConfig.k (the paper's k) is `keys_per_head` where a function takes the budget; `k` is the keys.
`python sea.py` walks through the inference path on a small input.
"""

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


ESTIMATORS = ("paper", "residual")  # SEAConfig.estimator


@dataclass
class SEAConfig:
    k: int = 64  # the budget: keys kept per query per head, on average over the heads (the paper's k)
    t_m: int = 256  # T_M, the predictor length: bins per compressed attention row
    nbf: float = 8  # Performer feature factor: m = int(D * ln(D) / nbf) random features
    query_chunk: int = 256  # query rows per step at inference, all eight steps: bounds the memory
    use_kernel: Optional[bool] = None  # Triton steps 5-7 (kernel.py): None = on CUDA at inference
    estimator: str = "paper"  # "paper", or "residual" (ours): a learned residual on the keys' heuristic estimate
    sinks: int = 4  # the sink-window control: the first keys every row keeps (StreamingLLM's attention sinks)
    sink_bin: bool = False  # beyond the paper: every head keeps the bin holding key 0, within the budget
    block: int = 4  # the block controls: keys per fixed block
    sub_bins: int = 4  # the heuristic estimate (residual estimator, sea-heuristic): key blocks per bin, at least
    finalists: int = 1  # sea-heuristic: the estimate's top finalists x n_i cells of a row rescored exactly (1: none)
    overlap: bool = False  # the heuristic estimate: a bin reads every block holding one of its keys (bin_block_runs)

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"SEAConfig.k={self.k} must be >= 1")
        if self.t_m < 4 or self.t_m % 4:
            raise ValueError(f"SEAConfig.t_m={self.t_m} must be a "
                             f"positive multiple of 4 (the decoder upsamples by 4)")
        if self.nbf <= 0:
            raise ValueError(f"SEAConfig.nbf={self.nbf} must be positive")
        if self.query_chunk < 1:
            raise ValueError(f"SEAConfig.query_chunk={self.query_chunk} must be >= 1")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"SEAConfig.estimator={self.estimator!r}: choose one of {ESTIMATORS}")
        if self.block < 1 or self.sub_bins < 1 or self.finalists < 1:
            raise ValueError(f"SEAConfig.block={self.block}, sub_bins={self.sub_bins} and finalists={self.finalists} "
                             f"must be >= 1")


def full_precision(x):
    """x in at least float32 (float64 stays float64): SEA's estimate runs in full precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# -----------------------------------------------------------------------------
# grouped-query attention (SmolLM2: 9 query heads share 3 key/value heads): the mechanisms take keys and
# values with their own head count H_kv, query head h reading key/value head h // G, G = H / H_kv; nothing the
# size of the keys is ever copied per query head

def grouped_matmul(a, b):
    """a (B, H, R, X) @ b (B, H_kv, X, Y) -> (B, H, R, Y), query head h against key/value head h // G:
    a group's G query heads ride along the rows, (B, H_kv, G R, X), so b is read as it is, not copied."""
    B, H, R, X = a.shape
    return (a.reshape(B, b.size(1), -1, X) @ b).view(B, H, R, -1)


def query_heads(x, n_head):
    """x (B, H_kv, R, Y) -> (B, n_head, R, Y), each key/value head repeated for its group of query
    heads: a copy, so only for a few rows (a chunk's new keys and values), never a whole cache."""
    return x if x.size(1) == n_head else x.repeat_interleave(n_head // x.size(1), dim=1)


# -----------------------------------------------------------------------------
# rows, keys and bins: row i sees keys 0..i, which its T_M bins cut into runs of consecutive keys

def causal_mask(rows, T):
    """(R, T) bool: key j is visible from row i when j <= i."""
    return torch.arange(T, device=rows.device)[None, :] <= rows[:, None]


def bin_edges(rows, t_m):
    """(R, T_M + 1): bin c of row i holds keys [edges[c], edges[c + 1]).

    Key j <= i falls in bin c(i, j) = floor((j + 0.5) * T_M / (i + 1)), so bin c starts at
    the first j with (2j + 1) T_M >= 2 c (i + 1): ceil((2c(i + 1) - T_M) / (2 T_M)), which for
    j >= 0 is floor((2c(i + 1) + T_M - 1) / (2 T_M)): the one place this formula is written (kernel.bin_start
    is its Triton twin).
    """
    c = torch.arange(t_m + 1, device=rows.device)
    return (2 * c * (rows[:, None] + 1) + t_m - 1) // (2 * t_m)


def bin_widths(rows, t_m):
    """(R, T_M): how many keys each bin of each row holds (0 for the empty bins of short rows)."""
    return bin_edges(rows, t_m).diff(dim=1)


def key_bins(rows, T, t_m):
    """(R, T) long: the bin c(i, j) of key j in row i, the last bin whose first key (bin_edges) is at most j
    (keys j > i: the last bin)."""
    keys = torch.arange(T, device=rows.device).expand(len(rows), T).contiguous()
    return (torch.searchsorted(bin_edges(rows, t_m), keys, right=True) - 1).clamp(max=t_m - 1)


# -----------------------------------------------------------------------------
# step 1: the linear estimate, causal FAVOR+ with the ReLU kernel over [positions, values]

def gaussian_orthogonal_matrix(m, d):
    """(m, d) random features: orthogonal rows in blocks of d, each row with a Gaussian norm."""
    blocks = [torch.linalg.qr(torch.randn(d, d))[0].T for _ in range(math.ceil(m / d))]
    norms = torch.randn(m, d).norm(dim=1, keepdim=True)
    return torch.cat(blocks)[:m] * norms


class ReLUFeatures(nn.Module):
    """phi(x) = relu((x * D^-1/4) W^T) + 1e-3, with a fixed random W of m = D ln(D) / nbf rows."""

    def __init__(self, head_dim, nbf):
        super().__init__()
        m = max(1, int(head_dim * math.log(head_dim) / nbf))
        self.register_buffer("W", gaussian_orthogonal_matrix(m, head_dim))

    def forward(self, x):  # (..., D) -> (..., m)
        return F.relu((x * x.size(-1) ** -0.25) @ self.W.T) + 1e-3


def causal_linear_attention(phi_q, phi_k, v, sums=None, block=128):
    """c_i = phi(q_i)^T S_i / phi(q_i)^T z_i, S_i = sum_{j<=i} phi(k_j) v_j^T, z_i = sum_{j<=i} phi(k_j).

    phi_q, phi_k (B, H, T, m), v (B, H, T, E) -> (B, H, T, E), and the sums (S, z) after the
    last row. The rows go in blocks, all in one batch of matmuls: inside a block a small causal
    (block x block) product, from the blocks before their sums S (B, H, m, E) and z (B, H, m),
    which start from `sums` when the rows continue earlier ones (decoding).
    """
    B, H, T, m = phi_q.shape
    block = min(block, T)  # a decoding step's one row is a block of its own, not padded to 128
    n = -(-T // block)
    # rows past T, to fill the last block: zero keys and values add nothing to any sum; queries of ones
    # keep those rows' denominators above 0, so even their gradient (zero, they are dropped) stays finite
    blocks = lambda x, fill=0.0: F.pad(x, (0, 0, 0, n * block - T), value=fill).view(B, H, n, block, -1)
    q, k, u = blocks(phi_q, 1.0), blocks(phi_k), blocks(v)  # (B, H, n, block, m or E)
    S0, z0 = sums if sums is not None else (phi_q.new_zeros(B, H, m, v.size(-1)), phi_q.new_zeros(B, H, m))
    block_S, block_z = k.transpose(-2, -1) @ u, k.sum(-2)  # each block's own sums, (B, H, n, m, E), (B, H, n, m)
    S = S0[:, :, None] + F.pad(block_S.cumsum(2), (0, 0, 0, 0, 1, 0))  # (B, H, n + 1, m, E): before each block
    z = z0[:, :, None] + F.pad(block_z.cumsum(2), (0, 0, 1, 0))
    local = (q @ k.transpose(-2, -1)).tril()  # (B, H, n, block, block), causal inside a block
    numerator = local @ u + q @ S[:, :, :-1]
    denominator = local.sum(-1) + (q @ z[:, :, :-1, :, None]).squeeze(-1)
    out = (numerator / denominator.unsqueeze(-1)).view(B, H, n * block, -1)[:, :, :T]  # padded rows dropped
    return out, (S[:, :, -1], z[:, :, -1])


# -----------------------------------------------------------------------------
# step 2: encode

def make_encoder(head_dim):
    """Step 2: e = GELU(LayerNorm(Linear(f))), f = [c, v] (3D wide) -> e (2D wide)."""
    D = head_dim
    return nn.Sequential(nn.Linear(3 * D, 2 * D), nn.LayerNorm(2 * D), nn.GELU())


# -----------------------------------------------------------------------------
# step 3: decode, the compressed scores s_hat; and ours, the heuristic estimate from the keys

class CompressedScoreDecoder(nn.Module):
    """e (B, H, T, 2D) -> compressed scores s_hat (B, H, T, T_M).

    r = Linear(e) gives two channels of T_M/4 per head; a CNN over the image (query rows
    x bins) with causal 3x3 convolutions (dilation 2, padded above only, so a row sees
    itself and earlier rows), a x4 nearest upsample along the bins and a 1x1 convolution
    to one channel per head (run before the upsample, which gives the same numbers on a
    quarter of the bins); LayerNorms on the way in and out.
    """

    HALO = 8  # rows above a chunk the two dilated convolutions reach: 2 convs x dilation 2 x 2 taps

    def __init__(self, n_head, width, t_m):
        super().__init__()
        self.t_m = t_m
        self.project = nn.Linear(width, 2 * t_m // 4)
        self.norm_in = nn.LayerNorm(t_m // 4)
        self.conv1 = nn.Conv2d(2 * n_head, 2 * n_head, kernel_size=3, dilation=2)
        self.conv2 = nn.Conv2d(2 * n_head, 2 * n_head, kernel_size=3, dilation=2)
        self.to_heads = nn.Conv2d(2 * n_head, n_head, kernel_size=1)
        self.norm_out = nn.LayerNorm(t_m)

    @staticmethod
    def causal_conv(conv, x):
        return conv(F.pad(x, (2, 2, 4, 0)))  # (left, right) bins, (top, bottom) rows

    def forward(self, e):
        B, H, T, _ = e.shape
        r = self.project(e).view(B, H, T, 2, self.t_m // 4)
        x = r.permute(0, 1, 3, 2, 4).reshape(B, 2 * H, T, self.t_m // 4)  # channels (h, 2)
        x = F.relu(self.causal_conv(self.conv1, self.norm_in(x)))
        x = F.relu(self.causal_conv(self.conv2, x))
        # the 1x1 convolution and the x4 nearest upsample commute: convolve the quarter-width image
        x = self.to_heads(x).repeat_interleave(4, dim=-1)  # (B, H, T, T_M)
        return self.norm_out(x)


class KeyBlocks:
    """The keys as the heuristic estimate reads them: the mean key and the per-channel variance of each block
    [j size, (j + 1) size) of consecutive keys, of one block size at a time, (B, H_kv, n, D) each. Kept as the
    blocks complete: a chunk of rows or a decoding step computes only the blocks completed since the one
    before (GrowingRows), and a new block size (every T_M sub_bins rows, heuristic_block_size) starts over, so
    a pass over T rows costs O(T D) a block size. Taken from the keys in float64, kept in their precision (at
    least float32): a block's variance is a small difference where its keys sit far from 0 (a channel near 20
    whose 8 keys vary by about 1). Between decoding steps it is 2 D numbers a block, a few per key."""

    def __init__(self):
        self.size = self.count = 0  # the block size and the blocks kept
        self.mean, self.variance = GrowingRows(), GrowingRows()

    def moments(self, k, size, count):
        """(mean, variance) of the first `count` blocks of `size` keys of k (B, H_kv, T, D), T >= count size."""
        if size != self.size:  # a new block size: no block of the old one is of use
            self.__init__()
            self.size = size
        if count > self.count or self.mean.buffer is None:  # (none at all yet: an empty start)
            blocks = k[:, :, self.count * size:count * size].double().unflatten(2, (-1, size))  # (B, H_kv, n, size, D)
            dtype = torch.promote_types(k.dtype, torch.float32)
            mean = blocks.mean(3, keepdim=True)  # (B, H_kv, n, 1, D)
            self.mean.append(mean.squeeze(3).to(dtype))
            self.variance.append((blocks - mean).square().mean(3).to(dtype))
            self.count = count
        return self.mean.rows()[:, :, :count], self.variance.rows()[:, :, :count]


def spread_bonus(variance, n):
    """How far the log of the mean of exp over n logits lies above their mean, from their variance: variance / 2
    if they were normal, but never more than n logits of that variance can give, which is when one lies far
    above the rest, log((exp(s r) + (n - 1) exp(-s / r)) / n) with s the standard deviation and r = sqrt(n - 1),
    written as s r + log1p((n - 1) exp(-s (r + 1 / r))) - log n. Without that cap, blocks of 2 to 8 keys were
    overvalued whenever their keys' channels varied. variance (...), n the keys per block (a number); 0 if n <= 1."""
    if n <= 1:
        return torch.zeros_like(variance)
    root = math.sqrt(n - 1)
    spread = variance.clamp_min(1e-30).sqrt()  # (no infinite gradient at 0)
    most = torch.log1p((n - 1) * torch.exp(-(root + 1 / root) * spread)) + (root * spread - math.log(n))
    return torch.minimum(variance / 2, most)


def heuristic_block_size(rows, blocks):
    """(R,) long: the keys per block of the heuristic estimate in each row i, (i + 1) // blocks (at least 1), so
    that a row sees between `blocks` blocks and twice that (at most 1.25 times that once the size is 4; a shorter
    row, one key a block), and the size changes only every `blocks` rows: a chunk's rows share one or two sizes."""
    return ((rows + 1) // blocks).clamp_min(1)


def bin_block_runs(rows, t_m, size, count, overlap=False):
    """Which of the first `count` blocks of `size` keys each bin c of row i takes: the run of blocks first ..
    first + length - 1, (R, T_M) each. By default the blocks whose middle falls in the bin: block j's middle,
    j size + size / 2, lies in bin c from the first j with (2 j + 1) size T_M >= 2 c (i + 1), so each block
    counts once. With `overlap`, every block that holds one of the bin's keys, so a block across a bin's edge
    counts in both bins: a strong key is never credited to the next bin alone (for the finalists, whose exact
    scores then take back what a bin was lent)."""
    if overlap:
        edges = bin_edges(rows, t_m)  # (R, T_M + 1)
        first = (edges[:, :-1] // size).clamp(max=count)
        return first, ((edges[:, 1:] + size - 1) // size).clamp(max=count) - first
    c = torch.arange(t_m + 1, device=rows.device)
    starts = (-((size * t_m - 2 * c * (rows[:, None] + 1)) // (2 * size * t_m))).clamp(0, count)  # (R, T_M + 1)
    return starts[:, :-1], starts.diff(dim=-1)


def block_logits(q, mean, variance, size):
    """(B, H, R, n): for the query rows q (B, H, R, D), each of n blocks of `size` keys its log of the mean of
    exp(q . k) over its keys, estimated from the keys' mean and per-channel variance (B, H_kv, n, D) each
    (KeyBlocks) as mean logit + spread_bonus. Two matmuls."""
    mean, variance = mean.to(q.dtype), variance.to(q.dtype)
    logits = grouped_matmul(q, mean.transpose(-2, -1))  # (B, H, R, count): each block's mean logit
    if size > 1:
        logits = logits + spread_bonus(grouped_matmul(q * q, variance.transpose(-2, -1)), size)
    return logits


def mean_over_block_runs(logits, first, blocks):
    """log of the mean of exp(logits) over runs of consecutive blocks: logits (B, H, R, n); run c of row r the
    blocks first[r, c] .. first[r, c] + blocks[r, c] - 1 ((R, C) each) -> (B, H, R, C). A run holds a few
    blocks (at most about 2 sub-bins + 2), so its exp are summed a place in the run at a time: one gather per
    place, the places past a run's end left out; no block outside a run is read. The exp are taken below each
    row's largest logit; a run with no block (or all of whose exp underflow) gets the dtype's lowest number."""
    B, H, R, n = logits.shape
    if n == 0:  # no block at all
        return logits.new_full((B, H, R, first.size(-1)), torch.finfo(logits.dtype).min)
    shift = logits.detach().amax(-1, keepdim=True)  # (B, H, R, 1)
    weights = (logits - shift).exp_()
    mass = weights.new_zeros(B, H, R, first.size(-1))
    for place in range(int(blocks.max())):
        index = (first + place).clamp(max=n - 1).expand(B, H, R, -1)
        mass += weights.gather(-1, index).masked_fill_(place >= blocks, 0.0)
    log_mean = mass.log_() - blocks.clamp_min(1).to(logits.dtype).log() + shift
    return log_mean.clamp_min(torch.finfo(logits.dtype).min)


def block_bin_scores(q, k, blocks, rows, t_m, size, overlap=False):
    """The middle bins' part of heuristic_bin_scores for the query rows q (B, H, R, D) at positions `rows`, all of
    whose blocks hold `size` keys: (B, H, R, T_M), each bin the log of the mean of exp(q_i . k_j) over the keys
    of its blocks (bin_block_runs; block_logits, mean_over_block_runs). Two matmuls and a few gathers: O(T / size)
    work a row. The first and the last bin here are not used."""
    count = (int(rows[-1]) + 1) // size  # the blocks complete in the last row
    logits = block_logits(q, *blocks.moments(k, size, count), size)  # (B, H, R, n)
    return mean_over_block_runs(logits, *bin_block_runs(rows, t_m, size, count, overlap))


def heuristic_bin_scores(q, k, blocks, rows, t_m, sub_bins, overlap=False):
    """Ours, no training: an estimate of s_hat (B, H, R, T_M) for the query rows q (B, H, R, D) at
    positions `rows` from the keys k (B, H_kv, T, D) themselves. s_hat gives every key of bin c the
    weight exp(s_c), so the ideal s_c is the log of the mean of exp(q_i . k_j) over the bin's keys.
    The middle bins estimate it from fixed blocks of keys (block_bin_scores), at least `sub_bins` a bin
    (heuristic_block_size; which blocks a bin takes: bin_block_runs, with `overlap`), every block's logits from
    their mean and variance (the KeyBlocks `blocks`, grown as they complete) as mean + spread_bonus. Without the
    spread (the mean logit alone, a lower bound by Jensen) a block of 8 keys that holds one strong key is
    undervalued many times over. The first bin (the attention sink) and the last (the query's own
    neighbourhood), where pretrained heads put much mass on single keys, are computed exactly from their few
    keys. 0 for empty bins.
    O(T / block size) work a row: between T_M sub_bins and twice that."""
    B, H, R, _ = q.shape
    q, k = full_precision(q), full_precision(k)
    sizes, counts = torch.unique_consecutive(heuristic_block_size(rows, t_m * sub_bins), return_counts=True)
    parts = torch.arange(R, device=q.device).split(counts.tolist())  # the runs of rows with one block size
    middle = torch.cat([block_bin_scores(q[:, :, part], k, blocks, rows[part], t_m, int(size), overlap)
                        for part, size in zip(parts, sizes)], dim=2)
    widths = bin_widths(rows, t_m)  # (R, T_M)
    W = -(-k.size(2) // t_m) + 1  # the widest a bin can be, known without a host sync
    slot = torch.arange(W, device=q.device)
    first = grouped_matmul(q, k[:, :, :W].transpose(-2, -1))  # (B, H, R, W): the first bin's keys are 0, 1, ...
    last_keys = k[:, :, (rows[:, None] - W + 1 + slot).clamp_min(0)]  # (B, H_kv, R, W, D): keys i - W + 1 .. i
    groups = q.reshape(B, k.size(1), -1, R, q.size(-1))  # (B, H_kv, G, R, D)
    last = torch.einsum("bkgrd,bkrwd->bkgrw", groups, last_keys).reshape(B, H, R, W)
    scores = torch.cat([log_mean_exp(first, slot < widths[:, :1]), middle[..., 1:-1],
                        log_mean_exp(last, slot >= W - widths[:, -1:])], dim=-1)
    return scores.masked_fill(widths == 0, 0.0)


class RowLayout(NamedTuple):
    """What a decoding step needs of a row's shape, which depends on its position alone. For
    heuristic_row_scores: the block size; the middle bins' blocks, first .. end - 1; the keys of the first and
    the last bin, end_keys; the units, each a place in those blocks then those keys, unit_index (None where each
    is one place in order; with overlapping runs a block across a bin's edge is a unit of both bins), and the bin
    of each, unit_bin; the log of how many a bin holds, log_units (T_M,) (0 where none); empty (T_M,) bool, a
    short row's empty bins, or None. For row_sparse_attention: each bin's keys, widths (T_M,), the widest bin's
    keys, widest, and each bin's keys as a row of that many, bin_keys (T_M, widest) (past a bin's own keys, others
    up to the row's last, or it again) and which of them are its own, bin_inside (T_M, widest) bool."""
    size: int
    first: int
    end: int
    end_keys: torch.Tensor
    unit_index: Optional[torch.Tensor]
    unit_bin: torch.Tensor
    log_units: torch.Tensor
    empty: Optional[torch.Tensor]
    widths: torch.Tensor
    widest: int
    bin_keys: torch.Tensor
    bin_inside: torch.Tensor


@functools.lru_cache(maxsize=4)
def row_layout(row, t_m, sub_bins, device, overlap=False):
    """The RowLayout of row `row`: worked out once a decoded token, shared by every layer."""
    rows = torch.tensor([row])
    edges = bin_edges(rows, t_m)[0]  # (T_M + 1,)
    widths = edges.diff()  # (T_M,)
    size = int(heuristic_block_size(rows, t_m * sub_bins))
    runs = bin_block_runs(rows, t_m, size, (row + 1) // size, overlap)
    first, lengths = (x[0, 1:t_m - 1] for x in runs)  # (T_M - 2,) each: bin c's blocks first .. first + length - 1
    lo, hi = int(first[0]), int((first + lengths).max())
    places = torch.arange(int(lengths.sum())) - (lengths.cumsum(0) - lengths).repeat_interleave(lengths)
    blocks = first.repeat_interleave(lengths) + places  # each middle unit's block
    end_keys = torch.cat([torch.arange(edges[1]), torch.arange(edges[t_m - 1], row + 1)])  # the end bins' keys
    unit_index = None
    if not torch.equal(blocks, torch.arange(lo, hi)):  # a block in two bins
        unit_index = torch.cat([blocks - lo, hi - lo + torch.arange(len(end_keys))]).to(device)
    unit_bin = torch.cat([torch.arange(1, t_m - 1).repeat_interleave(lengths),
                          torch.zeros(int(edges[1]), dtype=torch.long),
                          torch.full((row + 1 - int(edges[t_m - 1]),), t_m - 1)])
    units = torch.zeros(t_m).index_add_(0, unit_bin, torch.ones(len(unit_bin)))
    empty = (widths == 0).to(device) if bool((widths == 0).any()) else None
    widest = int(widths.max())
    slot = edges[:-1, None] + torch.arange(widest)  # (T_M, widest)
    inside = slot < edges[1:, None]
    return RowLayout(size, lo, hi, end_keys.to(device), unit_index, unit_bin.to(device),
                     units.clamp_min(1).log().to(device), empty, widths.to(device), widest,
                     slot.clamp(max=row).to(device), inside.to(device))


@functools.lru_cache(maxsize=4)
def row_cell_budget(row, n_head, keys_per_head, t_m):
    """row_budget of the one row `row`, an int: worked out once a decoded token, shared by every layer."""
    return int(row_budget(torch.tensor([row]), n_head, keys_per_head, t_m))


def heuristic_row_scores(q, k, blocks, row, t_m, sub_bins, overlap=False):
    """heuristic_bin_scores for one query row q (B, H, 1, D) at position `row` (an int), as a decoding step
    runs it: the same numbers, with the row's layout (row_layout: its bins, blocks and their indices) known on
    the host, the block moments (KeyBlocks) read for the middle bins' blocks only, and every bin's log of the
    mean of exp over its units (the middle bins' blocks, the end bins' keys) in one scatter of the units' logits
    (each bin shifted by its own largest), so a step makes a fixed, small number of operator calls whatever the
    context."""
    layout = row_layout(row, t_m, sub_bins, q.device, overlap)
    q, k = full_precision(q), full_precision(k)
    mean, variance = (m[:, :, layout.first:] for m in blocks.moments(k, layout.size, layout.end))
    middle = block_logits(q, mean, variance, layout.size)
    ends = grouped_matmul(q, k[:, :, layout.end_keys].transpose(-2, -1))  # the end bins' keys, exactly
    logits = torch.cat([middle, ends], dim=-1)  # (B, H, 1, units)
    if layout.unit_index is not None:
        logits = logits[..., layout.unit_index]
    unit_bin = layout.unit_bin.expand_as(logits)
    shift = logits.new_full((*logits.shape[:3], t_m), float("-inf")).scatter_reduce_(-1, unit_bin, logits, "amax")
    mass = logits.new_zeros(shift.shape).scatter_add_(-1, unit_bin, (logits - shift.gather(-1, unit_bin)).exp_())
    scores = (mass.log_() + shift - layout.log_units).clamp_min_(torch.finfo(logits.dtype).min)  # (B, H, 1, T_M)
    return scores if layout.empty is None else scores.masked_fill_(layout.empty, 0.0)


def row_sparse_attention(q, k, v, s_hat, layout, budget, finalists=0):
    """Steps 4 to 7 of one decoded row of ours, in a fixed, small number of operator calls: q (B, H, 1, D); k, v
    (B, H_kv, row + 1, D); s_hat (B, H, 1, T_M) the heuristic's scores (heuristic_row_scores); the row's RowLayout
    and its budget (row_cell_budget). Each bin's estimated share of its head's attention, in logs (step 4); the
    `budget` best cells of all heads by one top-k (step 5; with `finalists` cells, the best so many first,
    rescored exactly as rescore_finalists does); each kept bin's keys gathered at once (row_cell_logits, step 6)
    and each head's softmax over its own cells' keys (step 7) -> (B, H, 1, D). The numbers of attend_chunk's
    steps 4-7 (tested), but for ties: where cells have equal shares, the top-k's own order decides."""
    B, H, _, T_M = s_hat.shape
    q, k, v, scores = full_precision(q), full_precision(k), full_precision(v), full_precision(s_hat)
    log_widths = layout.widths.to(scores.dtype).log()  # -inf for empty bins, as estimated_bin_shares takes it
    log_shares = lambda scores: (scores + log_widths).log_softmax(-1).view(B, H * T_M)
    if finalists and layout.size > 1:  # blocks of one key: the estimate is exact already
        cells = log_shares(scores).topk(finalists).indices  # (B, n)
        logits, _ = row_cell_logits(q, k, cells, layout)
        width = layout.widths[cells % T_M]  # (B, n)
        exact = torch.where(width > 0, logits.logsumexp((1, 3)) - width.log(), 0.0)  # an empty bin stays empty
        scores = scores.view(B, H * T_M).scatter(1, cells, exact).view(B, H, 1, T_M)
    logits, index = row_cell_logits(q, k, log_shares(scores).topk(budget).indices, layout)  # (B, H, n, W)
    probs = logits.view(B, H, 1, -1).softmax(-1).nan_to_num_(0.0)  # a head that kept no key: zeros
    return grouped_matmul(probs, v.gather(2, index))


def row_cell_logits(q, k, cells, layout):
    """The logits of one query row q (B, H, 1, D) over the keys of the cells (B, n) of its row, cell h T_M + c
    being bin c of head h: every key/value head's keys at the cells' bins are gathered at once (B, H_kv, n W, D),
    every query head scores those of its own key/value head, and all but a cell's own head on its own bin's keys
    are -inf: (B, H, n, W), W the row's widest bin; and the gather's index (B, H_kv, n W, D), for the values."""
    B, H, _, D = q.shape
    T_M, (n, W) = layout.widths.size(0), (cells.size(1), layout.widest)
    head, c = cells // T_M, cells % T_M
    index = layout.bin_keys[c].view(B, 1, n * W, 1).expand(B, k.size(1), n * W, D)
    logits = grouped_matmul(q, k.gather(2, index).transpose(-2, -1)).view(B, H, n, W)
    mine = (head[:, None, :, None] == torch.arange(H, device=q.device)[:, None, None]) & layout.bin_inside[c][:, None]
    return logits.masked_fill_(~mine, float("-inf")), index


def log_mean_exp(logits, kept):
    """log of the mean of exp(logits) (B, H, R, W) over the slots `kept` (R, W): (B, H, R, 1). A finite
    fill, not -inf, where a slot is not kept, so that even a row that keeps none has a finite gradient."""
    fill = torch.finfo(logits.dtype).min
    return logits.masked_fill(~kept, fill).logsumexp(-1, keepdim=True) - kept.sum(-1, keepdim=True).clamp_min(1).log()


# -----------------------------------------------------------------------------
# step 4: probabilities

def bin_probabilities(s_hat, rows, by_mass):
    """Step 4: p_hat (B, H, R, T_M), what step 5 ranks, from the compressed scores s_hat of the rows `rows`: the
    paper's softmax over the bins, or (by_mass, ours) each bin's estimated share of the head's attention
    (estimated_bin_shares), as the perfect estimate ranks them."""
    return estimated_bin_shares(s_hat, rows) if by_mass else s_hat.softmax(-1)


def estimated_bin_shares(s_hat, rows):
    """(B, H, R, T_M): each bin's share of a head's estimated attention, softmax(s_c + log width_c) over
    the bins (0 for empty bins), s_hat (B, H, R, T_M) the per-key log weights of the query rows `rows`."""
    log_widths = bin_widths(rows, s_hat.size(-1)).to(s_hat.dtype).log()  # -inf for empty bins
    return (s_hat + log_widths).softmax(-1)


# -----------------------------------------------------------------------------
# step 5: grouped top-k, the kept bins

def row_budget(rows, n_head, keys_per_head, t_m):
    """Step 5: query row i keeps n_i = clamp(round(H k T_M / (i + 1)), 1, H T_M) cells, k = keys_per_head (the
    paper's k, SEAConfig.k): about k keys per head on average, H k in all."""
    return torch.round(n_head * keys_per_head * t_m / (rows.double() + 1)).long().clamp(1, n_head * t_m)


def grouped_topk(p_hat, rows, keys_per_head):
    """Step 5: keep the top n_i of the H * T_M cells of each row, across heads together.

    p_hat (B, H, R, T_M) -> keep (B, H, R, T_M) bool. Bins that hold no key (rows shorter
    than T_M) are ranked last, so short rows with a large budget come out dense. Ties go to the
    lower cell (the x4 upsample makes bins tie in groups of four, and ties must go the same way
    however many rows a chunk holds): every cell above the n_i-th largest value is kept, and of
    the cells equal to it the first ones, as many as the budget still allows. kernel.select_bins
    ranks the same way.
    """
    B, H, R, T_M = p_hat.shape
    scores = p_hat.masked_fill(bin_widths(rows, T_M) == 0, -1.0)  # empty bins last
    budget = row_budget(rows, H, keys_per_head, T_M)  # (R,)
    cells = scores.transpose(1, 2).reshape(B, R, H * T_M)  # a row's cells across heads
    threshold, following = budget_thresholds(cells, budget)  # (B, R, 1) each
    place = (budget - 1).expand(B, R)[..., None]  # (B, R, 1)
    keep = scores >= threshold.view(B, 1, R, 1)
    if bool(((following == threshold) & (place + 1 < H * T_M)).any()):  # ties past the budget: the first ones win
        above, tied = cells > threshold, cells == threshold
        room = budget[:, None] - above.sum(-1, keepdim=True)  # how many of the tied cells still fit
        keep = above | (tied & (tied.cumsum(-1) <= room))
        keep = keep.view(B, R, H, T_M).transpose(1, 2)
    return keep


def budget_thresholds(cells, budget):
    """The n_i-th largest of each row's cells (B, R, N), n_i = budget (R,), and the n_i + 1-th (the n_i-th again
    where there is none): (B, R, 1) each. A top-k costs about its k, and budgets fall as 1 / (i + 1), so the rows
    go in groups by the power of two above n_i + 1, each group's top-k one past its largest n_i."""
    B, R, N = cells.shape
    threshold, following = cells.new_empty(B, R, 1), cells.new_empty(B, R, 1)
    group_of = torch.log2((budget + 1).clamp(max=N).double()).ceil().long()  # (R,)
    groups = group_of.unique().tolist()
    for group in groups:
        members = (group_of == group).nonzero().flatten() if len(groups) > 1 else slice(None)  # r rows
        n_max = min(int(budget[members].max()) + 1, N)  # one past each member's budget: ties past it show
        largest = cells[:, members].topk(n_max, dim=-1).values  # (B, r, n_max)
        place = (budget[members] - 1).expand(B, -1)[..., None]  # (B, r, 1)
        threshold[:, members] = largest.gather(-1, place)
        following[:, members] = largest.gather(-1, (place + 1).clamp(max=n_max - 1))
    return threshold, following


def rescore_finalists(s_hat, q, k, rows, keys_per_head, finalists, inexact):
    """Ours, beyond the paper, between steps 4 and 5: the cells that an estimate s_hat (B, H, R, T_M) of the query
    rows q (B, H, R, D) at positions `rows` ranks in the top finalists x n_i of their row (grouped_topk at
    finalists times the budget) get their exact score, the log of the mean of exp(q_i . k_j) over their bin's
    keys k (B, H_kv, T, D), read as step 7 reads keys (CellBlocks); rows whose estimate is exact already
    (inexact (R,) bool: False) are left as they are. Step 5 then ranks exact finalists against the estimated
    rest, so a bin the estimate overvalued gives its place to the next. About finalists x k keys read a head a
    row, few beside the estimate's own blocks. Returns the new s_hat."""
    chosen = inexact.nonzero().flatten()  # (R',) the rows to rescore
    if len(chosen) == 0:
        return s_hat
    edges = bin_edges(rows, s_hat.size(-1))
    widths = edges.diff(dim=1)  # (R, T_M)
    shares = estimated_bin_shares(s_hat[:, :, chosen], rows[chosen])  # (B, H, R', T_M)
    b, h, r, c = (grouped_topk(shares, rows[chosen], finalists * keys_per_head) & (widths[chosen] > 0)).nonzero(
        as_tuple=True)
    r = chosen[r]  # the chosen rows' places among all R
    start, length = edges[r, c], widths[r, c]
    exact = s_hat.new_empty(len(b))
    for cell, logits in CellBlocks(q, k, b, h, r, start, length).logits():
        exact[cell] = logits.logsumexp(-1).to(s_hat.dtype)
    return s_hat.index_put((b, h, r, c), exact - length.to(s_hat.dtype).log())


# -----------------------------------------------------------------------------
# step 6: decompress, the kept bins (step 5's form of the kept keys) -> key ranges (step 7's)

class KeptBins(NamedTuple):
    """Step 5's answer, SEA's form of the kept keys: the bins each head keeps in each row, bins (B, H, R, T_M)
    bool, of the query rows at positions `rows` (R,). The Triton kernel of step 7 reads it as it is; the
    PyTorch path decompresses it first (step 6, key_ranges)."""
    bins: torch.Tensor
    rows: torch.Tensor

    def mask(self, T):
        """(B, H, R, T) bool: key j kept by head h in row r, by the bin of each key."""
        return kept_key_mask(self.bins, int(self.rows[0]), T)

    def per_head(self):
        """(B, H, R): how many keys each head keeps in each row."""
        return (self.bins * bin_widths(self.rows, self.bins.size(-1))).sum(-1)


def decompress(keep, rows):
    """Step 6: kept bins -> key ranges, one per kept (batch, head, row, bin) cell.

    keep (B, H, R, T_M) bool, rows (R,) the query positions. Returns 1-D tensors b, h, r
    (r indexes the chunk, 0..R-1) and the cell's keys [start, start + length). Cells of
    one (batch, head, row) are contiguous and in key order: the FlatCSR of the paper.
    """
    edges = bin_edges(rows, keep.size(-1))
    widths = edges.diff(dim=1)
    b, h, r, c = (keep & (widths > 0)).nonzero(as_tuple=True)  # short rows' empty bins: skipped
    return b, h, r, edges[r, c], widths[r, c]


def key_ranges(kept):
    """Step 6 where it is needed: the KeyRanges of kept keys in either form."""
    if isinstance(kept, KeyRanges):
        return kept
    return KeyRanges(tuple(kept.bins.shape[:3]), *decompress(kept.bins, kept.rows))


class KeyRanges(NamedTuple):
    """Step 6's answer, and the controls' own form of the kept keys: runs of consecutive keys
    [start, start + length), one per *cell*, as five flat tensors b, h, r (r counts the chunk's rows from 0),
    start, length; a (b, h, r)'s cells contiguous and in key order (the paper's FlatCSR). shape: (B, H, R)."""
    shape: tuple
    b: torch.Tensor
    h: torch.Tensor
    r: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor

    def mask(self, T):
        """(B, H, R, T) bool: each cell adds +1 at its start and -1 past its end; the running sum is positive
        on the kept keys."""
        steps = torch.zeros(*self.shape, T + 1, dtype=torch.int8, device=self.start.device)  # the sums are 0 or 1
        one = torch.ones((), dtype=torch.int8, device=self.start.device)
        steps.index_put_((self.b, self.h, self.r, self.start), one)  # cells are disjoint: one start a place
        steps.index_put_((self.b, self.h, self.r, self.start + self.length), -one, accumulate=True)  # on a next start
        return steps.cumsum(-1, dtype=torch.int8)[..., :T] > 0

    def per_head(self):
        """(B, H, R): how many keys each head keeps in each row."""
        return self.length.new_zeros(self.shape).index_put_((self.b, self.h, self.r), self.length, accumulate=True)


class KeptKeys:
    """The kept keys of a chunk of query rows, built by where they come from: SEA's bins (KeptBins), or a
    control's runs of keys or single keys (KeyRanges)."""

    @staticmethod
    def of_bins(bins, rows):  # kept bins (B, H, R, T_M) of the rows at positions `rows` (R,)
        return KeptBins(bins, rows)

    @staticmethod
    def of_runs(B, H, runs):  # runs: [(start (R,), length (R,)), ...], the same for every (b, h)
        start, length = (torch.stack(column, dim=-1) for column in zip(*runs))  # (R, runs)
        b, h, r, run = (length > 0).expand(B, H, *length.shape).nonzero(as_tuple=True)
        return KeyRanges((B, H, length.size(0)), b, h, r, start[r, run], length[r, run])

    @staticmethod
    def of_mask(mask):  # (B, H, R, T) bool: every kept key a cell of its own
        b, h, r, key = mask.nonzero(as_tuple=True)
        return KeyRanges(tuple(mask.shape[:3]), b, h, r, key, torch.ones_like(key))


# -----------------------------------------------------------------------------
# step 7: sparse attention, exact softmax over the kept keys (pure PyTorch, O(kept keys) memory)

GATHERED_FLOATS = 1 << 20  # keys copied per piece of step 7 (4 MB): a piece is still in the CPU's cache when
# its scores are computed (measured: 1 << 20 ran 32k rows in 5.9 s, 1 << 22 in 6.5 s)


def row_table(x):
    """x (B, H, T, D) as one table of rows (N, D), a view where x's rows are contiguous (a decoding cache,
    a slice of longer rows; else a copy), and row(b, h, j), the table row of x[b, h, j]."""
    x = x if x.stride(-1) == 1 and x.stride(-2) == x.size(-1) else x.contiguous()
    B, H, T, D = x.shape
    row = lambda b, h, j: (b * x.stride(0) + h * x.stride(1)) // D + j
    return x.as_strided((row(B - 1, H - 1, T), D), (D, 1)), row


class CellBlocks:
    """Step 7's way of reading kept keys, one cell at a time, from the flat cells (b, h, r, start, length) of
    query rows q (B, H, R, D) over keys k (B, H_kv, T, D): each cell's keys as one block of W consecutive keys
    (W: the widest cell; a block that would run past T starts earlier, the extra keys masked), a row of a
    strided view of k whose row j holds keys j .. j + W - 1, so the copy is one contiguous block per cell.
    `slot` (cells, W): the keys of each block; `off_cell` (cells, W): those outside its cell."""

    def __init__(self, q, k, b, h, r, start, length):
        T, D, G = k.size(2), q.size(-1), q.size(1) // k.size(1)  # head h reads key/value head h // G
        (self.queries, q_row), (keys, k_row) = (row_table(full_precision(x)) for x in (q, k))
        self.W = W = int(length.max())
        first = start.clamp(max=T - W)  # (cells,) each block's first key
        self.key_runs = keys.as_strided((keys.size(0) - W + 1, W * D), (D, 1))  # run j: keys j .. j + W - 1, a view
        self.query_row, self.block_row = q_row(b, h, r), k_row(b, h // G, first)  # (cells,)
        self.slot = torch.arange(W, device=q.device) + first[:, None]  # (cells, W)
        self.off_cell = (self.slot < start[:, None]) | (self.slot >= (start + length)[:, None])

    def logits(self):
        """Yields, GATHERED_FLOATS keys at a time, (a slice of the cells, their logits q_i . k_j (n, W), -inf
        off each cell)."""
        W, D = self.W, self.queries.size(-1)
        per_piece = max(1, GATHERED_FLOATS // (W * D))
        for piece in range(0, len(self.query_row), per_piece):
            cell = slice(piece, piece + per_piece)
            query = self.queries.index_select(0, self.query_row[cell])[:, None, :]  # (n, 1, D)
            block = self.key_runs.index_select(0, self.block_row[cell]).view(-1, W, D)  # (n, W, D)
            scores = torch.bmm(query, block.transpose(1, 2)).view(-1, W)
            yield cell, scores.masked_fill(self.off_cell[cell], float("-inf"))


def sparse_attention(q, k, v, kept):
    """Step 7: softmax attention of the chunk's query rows q (B, H, R, D) over their kept keys only
    (KeptBins or KeyRanges), k, v (B, H_kv, T, D) -> (B, H, R, D), at least float32; a head that kept no key in a
    row gets zeros there (the running-mean gate carries it).

    The keys are read a block per cell (CellBlocks). The values are not copied: embedding_bag sums each cell's
    value rows, weighted, where they lie. Each cell gets its own softmax (max m, sum l, weighted values o), and
    the cells of one (batch, head, row) are merged at the end, the way flash attention merges key blocks:
    out = sum_c exp(m_c - M) o_c / sum_c exp(m_c - M) l_c, M the row's largest m_c.
    """
    B, H, R, D = q.shape
    G = H // k.size(1)
    _, b, h, r, start, length = key_ranges(kept)  # step 6, if not done
    cells = CellBlocks(q, k, b, h, r, start, length)
    values, v_row = row_table(full_precision(v))
    value_rows = v_row(b[:, None], h[:, None] // G, cells.slot)  # (cells, W)
    maxima, sums, outs = [], [], []
    for cell, scores in cells.logits():
        m = scores.detach().amax(-1)  # every cell holds a key: finite
        weights = torch.exp(scores - m[:, None])  # 0 off the cell
        maxima.append(m)
        sums.append(weights.sum(-1))
        outs.append(F.embedding_bag(value_rows[cell], values, per_sample_weights=weights, mode="sum"))  # (n, D)
    m, l, o = torch.cat(maxima), torch.cat(sums), torch.cat(outs)
    row = (b * H + h) * R + r  # (cells,) which (batch, head, row) each cell belongs to
    row_max = m.new_full((B * H * R,), float("-inf")).scatter_reduce(0, row, m, "amax")
    scale = torch.exp(m - row_max[row])
    total = m.new_zeros(B * H * R).index_add(0, row, l * scale)
    out = o.new_zeros(B * H * R, D).index_add(0, row, o * scale[:, None])
    return (out / total.clamp_min(torch.finfo(total.dtype).tiny)[:, None]).view(B, H, R, D)


def masked_attention(q, k, v, mask, rows_per_piece=256):
    """Step 7 as a dense softmax under a causal kept-key mask (B, H, R, T), for the last R query rows
    q (B, H, R, D) of the T keys: sparse_attention's numbers, but with dense scores, a piece of rows
    at a time over the keys the piece can see (about half the work of (B, H, R, T) scores).
    Training uses it (one large matmul trains faster than many small gathered blocks), and so do
    the window control and short rows."""
    q, k, v = full_precision(q), full_precision(k), full_precision(v)
    R, T = q.size(2), k.size(2)
    outs = []
    for first in range(0, R, rows_per_piece):
        last = min(first + rows_per_piece, R)
        seen = T - R + last  # the piece's rows see the keys 0 .. seen - 1
        kept = mask[:, :, first:last, :seen]
        scores = grouped_matmul(q[:, :, first:last], k[:, :, :seen].transpose(-2, -1))
        # a finite fill keeps gradients finite; rows that kept no key come out as zeros
        probs = scores.masked_fill(~kept, torch.finfo(q.dtype).min).softmax(-1) * kept.any(-1, keepdim=True)
        outs.append(grouped_matmul(probs, v[:, :, :seen]))
    return torch.cat(outs, dim=2)


# -----------------------------------------------------------------------------
# step 8: mix with the running mean of the values

def mix(context, g0, g1, v_sum, rows):
    """Step 8: o = g1 g0 o_sp + (1 - g1) mean_{j<=i} v_j for the query rows at positions `rows`: context o_sp
    (B, H, R, D), the gates' sigmoids g0, g1 (B, H, R, 1), v_sum (B, H_kv, R, D) the sums of v_j, j <= i."""
    return g1 * g0 * context + (1 - g1) * query_heads(v_sum, context.size(1)) / (rows + 1)[:, None]


# -----------------------------------------------------------------------------
# the layer model.py plugs in: the eight steps a chunk of rows at a time, the state decoding keeps

class GrowingRows:
    """(B, H, n, D) rows appended along dim 2 to a buffer that doubles when full, so n rows cost
    O(n) however many appends bring them: a decoding cache's keys and values (model.LayerCache),
    the heuristic estimate's block moments (KeyBlocks)."""

    def __init__(self, capacity=0):  # capacity: the rows expected in all, allocated at once when known
        self.buffer, self.length, self.capacity = None, 0, capacity

    def append(self, rows):  # (B, H, r, D) -> every row so far
        end = self.length + rows.size(2)
        if self.buffer is None or end > self.buffer.size(2):
            bigger = rows.new_empty(*rows.shape[:2], self.capacity if end <= self.capacity else 2 * end, rows.size(3))
            if self.buffer is not None:
                bigger[:, :, :self.length] = self.buffer[:, :, :self.length]
            self.buffer = bigger
        self.buffer[:, :, self.length:end] = rows
        self.length = end
        return self.rows()

    def rows(self):  # every row so far, (B, H, n, D)
        return self.buffer[:, :, :self.length]


class DecodingState(NamedTuple):
    """What a SEA or window layer keeps between decoding steps besides the keys and values
    (decoding): the linear estimate's prefix sums, the last rows of e that the causal
    CNN reaches (HALO), the running sum of the values and, for the heuristic estimate, the keys'
    block moments. The first three are None where the gates are open and steps 1-2 and 8 do not run."""
    sums: Optional[tuple]  # (S (B, H, m, 2D), z (B, H, m))
    e_tail: Optional[torch.Tensor]  # (B, H, <= HALO, 2D)
    v_sum: Optional[torch.Tensor]  # (B, H_kv, 1, D)
    key_blocks: Optional[KeyBlocks]


GATE_OPEN = 40.0  # sigmoid(40) rounds to 1 in float64: 1 - 4e-18


ESTIMATE_FLOATS = 1 << 20  # a chunk's (B, H, R, T_M) estimate at inference (4 MB): at 8,192 tokens and T_M = 2,048,
# chunks of 56 rows ran a layer in 7.3 s, of 256 rows in 9.9 s (every large tensor a fresh allocation)


class GatedSparseAttention(nn.Module):
    """SEA and its controls: the eight steps in order (attend_chunk). The linear estimate and the
    encoder (steps 1-2) feed the gates; step 7 is a softmax over the kept keys; the gate g0 and the
    running-mean mix of step 8 finish it. A subclass says which keys each query keeps
    (choose_keys): SEA by its estimate (steps 3-6), the controls by a rule."""

    FEW_KEYS = 1024  # rows that see at most this many keys run step 7 as a masked softmax: their many small
    # cells (early rows keep most bins, of one key each) cost more than the (R x T) scores

    def __init__(self, n_head, head_dim, max_positions, cfg):
        super().__init__()
        self.n_head, self.cfg = n_head, cfg
        D = head_dim
        self.features = ReLUFeatures(D, cfg.nbf)
        self.positions = nn.Parameter(torch.randn(max_positions, D))  # P, step 1
        self.encoder = make_encoder(D)  # step 2
        self.gates = nn.Linear(2 * D, 2)  # (g0, g1), steps 7-8
        self.reset_gates()

    def reset_gates(self):
        """The gates' start: sigmoid(3) = 0.95, close to plain sparse attention (a model's own initialisation
        of its linear layers, which zeroes biases, calls this after it)."""
        self.gates.reset_parameters()
        nn.init.constant_(self.gates.bias, 3.0)

    def open_gates(self):
        """Gates fully open, sigmoid(g0) = sigmoid(g1) = 1 exactly (in float32 and float64): the output is
        then the exact softmax over the kept keys, with no running mean. For the training-free
        comparisons, where a pretrained model's attention is only swapped, never trained."""
        with torch.no_grad():
            self.gates.weight.zero_()
            self.gates.bias.fill_(GATE_OPEN)
        return self

    def forward(self, q, k, v, need_weights=False):
        """q (already scaled), k, v (B, H_kv, T, D) -> out (B, H, T, D), aux.

        aux: kept_per_head (B, H, T), the keys each head kept in each row; with need_weights
        also kept_mask (B, H, T, T), and what the subclass adds for losses and pictures.
        All rows at once when the T x T mask is wanted anyway (training, pictures); else in
        chunks of rows, each carrying the DecodingState to the next, so memory stays O(T).
        """
        # full precision whatever autocast is on outside: the kept keys must not depend on it
        with torch.autocast(q.device.type, enabled=False):
            if need_weights or (torch.is_grad_enabled() and q.requires_grad):
                out, aux, _ = self.attend_chunk(q, k, v, 0, None, materialize=True)
                return out, aux if need_weights else {"kept_per_head": aux["kept_per_head"]}
            out, aux, _ = self.attend_in_chunks(q, k, v, 0, None)
        return out, aux

    def extend(self, q, k, v, row0, state):
        """Decoding, one token or a few at a time: the rows row0 .. row0 + R - 1 (q (B, H, R, D)), given k
        and v of every position so far and the DecodingState of the rows before (None at
        row 0). Returns (out (B, H, R, D), the state after these rows): the same numbers as the
        rows of one full pass."""
        with torch.autocast(q.device.type, enabled=False):
            out, _, state = self.attend_in_chunks(q, k, v, row0, state)
        return out, state

    def attend_in_chunks(self, q, k, v, row0, state):
        """attend_chunk over the rows row0 .. row0 + R - 1, chunk_rows at a time, passing the state along."""
        R, step = q.size(2), self.chunk_rows(q)
        out = v.new_empty(q.shape)  # each chunk's rows written in place: no list of chunks to concatenate
        kept = torch.empty(q.shape[:3], dtype=torch.long, device=q.device)
        for first in range(0, R, step):
            end = row0 + min(first + step, R)  # keys and values up to the chunk's last row
            rows = slice(first, first + step)
            out[:, :, rows], aux, state = self.attend_chunk(q[:, :, rows], k[:, :, :end], v[:, :, :end],
                                                            row0 + first, state)
            kept[:, :, rows] = aux["kept_per_head"]
        return out, {"kept_per_head": kept}, state

    def chunk_rows(self, q):
        """Query rows per chunk at inference: SEAConfig.query_chunk bounds the memory, and fewer where a chunk's
        (B, H, R, T_M) estimate would hold more than ESTIMATE_FLOATS numbers."""
        B, H = q.shape[:2]
        return max(1, min(self.cfg.query_chunk, ESTIMATE_FLOATS // (B * H * self.cfg.t_m)))

    def uses_kernel(self, q):
        """The Triton kernels (kernel.py) for steps 5 and 7: SEAConfig.use_kernel, by default on CUDA.
        They never need a backward pass: selection passes no gradient, and training runs step 7 masked."""
        return q.is_cuda if self.cfg.use_kernel is None else self.cfg.use_kernel

    def attend_chunk(self, q, k, v, row0, state, materialize=False):
        """The eight steps for the query rows row0 .. row0 + R - 1: q (B, H, R, D); k, v (B, H_kv, T, D)
        of every position up to the last row (T = row0 + R); state: the DecodingState after the
        rows before (None when row0 = 0). Returns (out (B, H, R, D), aux, the state after these
        rows). materialize: step 7 as a masked dense softmax, the (B, H, R, T) mask in aux."""
        T = k.size(2)
        rows = torch.arange(row0, T, device=q.device)
        new_k, e_rows, sums = k[:, :, row0:], None, None  # (B, H_kv, R, D)
        gated = self.needs_gates()
        if gated:  # steps 1-2: the linear estimate over [positions, values], encoded: e (B, H, R, 2D)
            new_v = full_precision(v[:, :, row0:])
            e, sums = self.encode(q, new_k, new_v, row0, None if state is None else state.sums)
            e_rows = e if state is None else torch.cat([state.e_tail, e], dim=2)  # and the CNN's halo rows above
        key_blocks = None
        if self.uses_key_blocks():
            key_blocks = KeyBlocks() if state is None else state.key_blocks
        # steps 3-5: the keys each (head, row) keeps
        kept, aux = self.choose_keys(q, k, e_rows, rows, key_blocks)
        # step 7: the exact softmax over the kept keys
        if materialize or T <= self.FEW_KEYS:
            mask = kept.mask(T)
            context = masked_attention(q, k, v, mask)
            if materialize:
                aux["kept_mask"] = mask
        elif self.uses_kernel(q) and isinstance(kept, KeptBins):  # the kernel reads the bins: no step 6
            from kernel import sparse_attention_blocks  # Triton is optional: import when used
            context = sparse_attention_blocks(q, k, v, kept.bins, row0)
        else:
            context = sparse_attention(q, k, v, key_ranges(kept))  # step 6, then 7
        aux["kept_per_head"] = kept.per_head()
        if not gated:  # open gates: steps 7-8 give the context itself, exactly
            return context.to(v.dtype), aux, DecodingState(None, None, None, key_blocks)
        # steps 7-8: the gate g0 on that context, the mix g1 with the running mean of the values
        g0, g1 = torch.sigmoid(full_precision(self.gates(e))).split(1, dim=-1)  # (B, H, R, 1) each
        v_sum = new_v.cumsum(dim=2) + (0 if state is None else state.v_sum)  # sum of v_j, j <= i, (B, H_kv, R, D)
        out = mix(context, g0, g1, v_sum, rows)
        state = DecodingState(sums, e_rows[:, :, -CompressedScoreDecoder.HALO:], v_sum[:, :, -1:], key_blocks)
        return out.to(v.dtype), aux, state

    def needs_gates(self):
        """Whether steps 1-2, the gates and the mix run. Open gates (open_gates: sigmoid 1 exactly) make step 8's
        output step 7's context exactly, so a control with open gates skips them (the training-free rows); SEA
        always runs them, as its estimate reads e."""
        return bool(self.gates.weight.any() or (self.gates.bias < GATE_OPEN).any())

    def encode(self, q, new_k, new_v, row0, sums=None):
        """Steps 1-2 for the rows row0 .. row0 + R - 1 (q (B, H, R, D); k, v (B, H_kv, R, D)): e (B, H, R, 2D)
        from the linear estimate over [positions, values], and its prefix sums after them."""
        B, H, R, D = q.shape
        q, k, v = full_precision(q), query_heads(full_precision(new_k), H), query_heads(full_precision(new_v), H)
        positions = self.positions[row0:row0 + R].expand(B, H, R, D).to(v.dtype)
        c, sums = causal_linear_attention(self.features(q), self.features(k), torch.cat([positions, v], -1), sums)
        return self.encoder(torch.cat([c, v], dim=-1)), sums  # f = [c, v] (B, H, R, 3D) -> e

    def choose_keys(self, q, k, e, rows, key_blocks):
        """The keys each head of the query rows q (B, H, R, D) at positions `rows` keeps: (KeptBins or KeyRanges,
        aux of (B, H, R, ...) tensors). k holds every key up to the last row; e the encoded rows,
        these rows' the last R, before them up to HALO rows above; key_blocks the keys'
        KeyBlocks where uses_key_blocks, else None."""
        raise NotImplementedError

    def uses_key_blocks(self):
        """Whether choose_keys reads the keys' block moments (KeyBlocks: the heuristic estimate's)."""
        return False

    def keep_bins(self, p_hat, q, k, rows):
        """Step 5 on the bin probabilities p_hat (B, H, R, T_M) of the query rows q at positions `rows`:
        the kept bins (B, H, R, T_M), in Triton where uses_kernel. With SEAConfig.sink_bin every head
        ranks the bin of key 0 (the attention sink) first."""
        T_M = self.cfg.t_m
        if self.cfg.sink_bin:  # shares are at most 1: a 2 ranks this cell above all the others
            p_hat = p_hat.scatter(-1, key_bins(rows, 1, T_M).expand(*p_hat.shape[:-1], 1), 2.0)
        if self.uses_kernel(q):  # no host sync
            from kernel import select_bins  # Triton is optional: import when used
            row0 = k.size(2) - q.size(2)
            return select_bins(p_hat, row0, row_budget(rows, self.n_head, self.cfg.k, T_M))
        return grouped_topk(p_hat, rows, self.cfg.k)


class SEAAttention(GatedSparseAttention):
    """SEA: the estimate (steps 3-4) picks the kept bins (5-6) of a sparse softmax (7)."""

    KERNEL_CHUNK = 16384  # query rows per step of the Triton path: bounds the (B, H, R, T_M) estimate

    def __init__(self, n_head, head_dim, max_positions, cfg):
        super().__init__(n_head, head_dim, max_positions, cfg)
        self.decoder = CompressedScoreDecoder(n_head, 2 * head_dim, cfg.t_m)
        if self.residual:  # the decoder's output starts at exactly 0: untrained, SEA is the heuristic estimate
            nn.init.zeros_(self.decoder.norm_out.weight)
            nn.init.zeros_(self.decoder.norm_out.bias)

    @property
    def residual(self):
        return self.cfg.estimator == "residual"

    def uses_key_blocks(self):
        return self.residual

    def needs_gates(self):
        return True

    def estimate(self, q, k, v):
        """Steps 1-3 for all rows at once: the compressed scores s_hat (B, H, T, T_M)."""
        with torch.autocast(q.device.type, enabled=False):
            key_blocks = KeyBlocks() if self.residual else None
            rows = torch.arange(k.size(2), device=q.device)
            return self.compressed_scores(q, k, self.encode(q, k, v, 0)[0], rows, key_blocks)

    def compressed_scores(self, q, k, e, rows, key_blocks):
        """Step 3 for the query rows q (B, H, R, D) at positions `rows`: the decoder's s_hat
        (B, H, R, T_M) from e (these rows' and up to HALO rows above); the residual estimator adds
        it to the heuristic estimate of the keys k (heuristic_bin_scores, from the KeyBlocks)."""
        s_hat = self.decoder(e)[:, :, -q.size(2):]
        if self.residual:  # the heuristic is the keys' own: no gradient reaches q and k through it
            with torch.no_grad():
                heuristic = heuristic_bin_scores(q, k, key_blocks, rows, self.cfg.t_m, self.cfg.sub_bins,
                                                 self.cfg.overlap)
            s_hat = s_hat + heuristic
        return s_hat

    def chunk_rows(self, q):
        return self.KERNEL_CHUNK if self.uses_kernel(q) else super().chunk_rows(q)  # the kernels: few, big steps

    def choose_keys(self, q, k, e, rows, key_blocks):
        s_hat = self.compressed_scores(q, k, e, rows, key_blocks)  # step 3
        p_hat = bin_probabilities(s_hat.detach(), rows, by_mass=self.residual)  # step 4 (no gradient: the estimate
        bins = self.keep_bins(p_hat, q, k, rows)  # 5 # learns from its loss only)
        return KeptBins(bins, rows), dict(kept_bins=bins, scores=s_hat)


# -----------------------------------------------------------------------------
# training: the teacher's attention, the estimate loss and its targets, the T x T views for masks and pictures

def exact_attention(q, k, rows):
    """softmax(q k^T) of the query rows q (B, H, R, D) at positions `rows` over keys j <= i, in float32:
    (B, H, R, T). The dense teacher's maps (model.py) and the analysis kinds' choice of keys."""
    scores = grouped_matmul(q, k.transpose(-2, -1)).float()
    return scores.masked_fill(~causal_mask(rows, k.size(2)), float("-inf")).softmax(-1)


def causal_attention_pieces(q, k, rows_per_piece=256):
    """The exact causal attention of q (B, H, T, D) over k (B, H_kv, T, D), a piece of rows at a time, each
    over the keys it can see: about half the work of the whole (T x T) map, and a piece's memory.
    Yields (rows (R,), probs (B, H, R, rows[-1] + 1)), the rows in order."""
    T = q.size(2)
    for first in range(0, T, rows_per_piece):
        last = min(first + rows_per_piece, T)  # the rows first .. last - 1 see the keys 0 .. last - 1
        rows = torch.arange(first, last, device=q.device)
        yield rows, exact_attention(q[:, :, first:last], k[:, :, :last], rows)


def estimated_attention_map(scores):
    """s_hat (B, H, T, T_M) -> the estimated attention (B, H, T, T): bins spread to keys, softmaxed."""
    B, H, T, T_M = scores.shape
    rows = torch.arange(T, device=scores.device)
    spread = full_precision(scores).gather(-1, key_bins(rows, T, T_M).expand(B, H, T, T))
    return spread.masked_fill(~causal_mask(rows, T), float("-inf")).softmax(-1)


def kept_key_mask(kept_bins, row0=0, T=None):
    """(B, H, R, T_M) kept bins of rows row0.. -> (B, H, R, T) bool: key j attended by head h in row i."""
    B, H, R, T_M = kept_bins.shape
    T = T or row0 + R
    rows = torch.arange(row0, row0 + R, device=kept_bins.device)
    mask = kept_bins.gather(-1, key_bins(rows, T, T_M).expand(B, H, R, T))
    return mask & causal_mask(rows, T)


class BinTargets(NamedTuple):
    """What the estimate loss needs of the teacher's attention t (B, H, T, T): far less than t itself."""
    mass: torch.Tensor  # (B, H, T, T_M): a_c, the teacher's mass in each bin
    negentropy: torch.Tensor  # (B, H, T): sum_j t_j log t_j of each row
    squares: torch.Tensor  # (B, H, T): sum_j t_j^2 of each row


def bin_mass(probs, rows, t_m):
    """The attention probs (B, H, R, T) of the query rows `rows` summed per bin: (B, H, R, T_M)."""
    B, H, R, T = probs.shape
    return probs.new_zeros(B, H, R, t_m).scatter_add_(-1, key_bins(rows, T, t_m).expand(B, H, R, T), probs)


def bin_targets(probs, rows, t_m):
    """The teacher's causal attention probs (B, H, R, T) of the query rows `rows` -> BinTargets: a row's
    T numbers reduced to T_M + 2, so a warm-up can drop each layer's map as soon as it is read."""
    return BinTargets(bin_mass(probs, rows, t_m), torch.xlogy(probs, probs).sum(-1), (probs * probs).sum(-1))


def attention_bin_targets(pieces, t_m):
    """BinTargets of a causal attention given as pieces (rows, probs) (causal_attention_pieces), each
    reduced to its mass per bin as it comes."""
    reduced = [bin_targets(probs, rows, t_m) for rows, probs in pieces]
    return BinTargets(*(torch.cat(parts, dim=2) for parts in zip(*reduced)))


def estimate_loss(scores, target):
    """SEA's estimate loss, 0.1 KL(target || estimate) + MSE(estimate, target), computed per bin.

    The estimated map (estimated_attention_map) gives every key of bin c of row i the probability
    exp(s_c) / Z_i, Z_i = sum_c w_c exp(s_c), w_c the keys in bin c: so log(estimate) is a
    log_softmax, and both terms need only each bin's key count w and teacher mass a:
        KL  = sum_j t_j log t_j - sum_c a_c log p_c           (per row, averaged over rows)
        MSE = sum_c w_c p_c^2 - 2 sum_c a_c p_c + sum_j t_j^2  (summed, over all T x T entries)
    scores (B, H, T, T_M) s_hat; target: the teacher's BinTargets (bin_targets of its causal
    probabilities). Equal to the same terms on the (B, H, T, T) estimated map, without building it.
    """
    B, H, T, T_M = scores.shape
    rows = torch.arange(T, device=scores.device)
    w = bin_widths(rows, T_M).to(target.mass.dtype)  # (T, T_M)
    scores = full_precision(scores)
    log_p = scores - torch.logsumexp(scores + w.clamp_min(1e-30).log(), dim=-1, keepdim=True)
    p = log_p.exp()
    kl = (target.negentropy - (target.mass * log_p).sum(-1)).mean()
    squared = (w * p * p).sum(-1) - 2 * (target.mass * p).sum(-1) + target.squares
    return 0.1 * kl + squared.sum() / (B * H * T * T)


# -----------------------------------------------------------------------------
# python sea.py: the eight steps on a small random input, with their shapes

def walk_through(B=1, H=2, T=48, D=16, cfg=SEAConfig(k=2, t_m=16), rows=(3, 11, 23, 47)):
    """Run SEAAttention's inference path (attend_chunk) once and print what each step produced, then a
    few rows' budgets and kept keys."""
    torch.manual_seed(0)
    attention = SEAAttention(H, D, T, cfg).eval()
    attention.FEW_KEYS = 0  # the sparse step 7 even on this short input
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    q = q * D ** -0.5
    shapes = {}

    def record(name):  # a forward hook that keeps the first call's inputs and output
        def hook(module, inputs, output):
            shapes.setdefault(name, (inputs, output))
        return hook

    hooks = [attention.features.register_forward_hook(record("features")),
             attention.encoder.register_forward_hook(record("encoder")),
             attention.decoder.register_forward_hook(record("decoder")),
             attention.gates.register_forward_hook(record("gates"))]
    with torch.no_grad():  # the inference path, all rows as one chunk
        out, aux, _ = attention.attend_chunk(q, k, v, 0, None)
    for hook in hooks:
        hook.remove()
    m = attention.features.W.size(0)
    b, h, r, start, length = decompress(aux["kept_bins"], torch.arange(T))  # step 6, as the PyTorch path runs it
    steps = [
        ("input", "q, k, v", q.shape, "q already scaled by D^-1/2"),
        ("1 linear estimate", "phi(q), phi(k)", shapes["features"][1].shape, f"m = {m} ReLU random features"),
        ("", "f = [c, v]", shapes["encoder"][0][0].shape, "c = causal FAVOR+ over [P, v], width 2D"),
        ("2 encode", "e", shapes["encoder"][1].shape, "GELU(LayerNorm(Linear(f)))"),
        ("3 decode", "s_hat", shapes["decoder"][1].shape, f"causal CNN, T_M = {cfg.t_m} bins"),
        ("4 probabilities", "p_hat", aux["scores"].shape, "softmax over the bins"),
        ("5 grouped top-k", "kept bins", aux["kept_bins"].shape,
         f"{int(aux['kept_bins'].sum())} (head, bin) cells kept in all"),
        ("6 decompress", "key ranges", (len(start),),
         "one [start, start + length) per kept cell (empty bins of short rows dropped)"),
        ("7 sparse attention", "(g0, g1)", shapes["gates"][1].shape,
         "softmax over each row's cells, a block of keys each, times sigmoid(g0)"),
        ("8 mix", "out", out.shape, "sigmoid(g1) * sparse + (1 - sigmoid(g1)) * running mean of v"),
    ]
    print(f"SEA on a random input: B={B} H={H} T={T} D={D}, T_M={cfg.t_m}, k={cfg.k}\n")
    for step, name, shape, note in steps:
        print(f"{step:<20} {name:<16} {str(tuple(shape)):<18} {note}")
    budget = row_budget(torch.arange(T), H, cfg.k, cfg.t_m)
    print("\nrow i sees keys 0..i; it keeps n_i = round(H k T_M / (i + 1)) of its H x T_M cells (step 5):")
    for i in rows:
        ranges = {head: [] for head in range(H)}
        for cell in ((b == 0) & (r == i)).nonzero().flatten().tolist():
            first, last = int(start[cell]), int(start[cell] + length[cell] - 1)
            ranges[int(h[cell])].append(f"[{first}]" if first == last else f"[{first}-{last}]")
        kept = "; ".join(f"head {head}: {' '.join(keys) or '-'}" for head, keys in ranges.items())
        print(f"row {i:>3} ({i + 1:>2} keys): n_i = {int(budget[i]):>2} cells, "
              f"{int(aux['kept_per_head'][0, :, i].sum()):>2} keys kept over {H} heads   {kept}")


if __name__ == "__main__":
    walk_through()
