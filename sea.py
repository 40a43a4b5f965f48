"""
SEA: Sparse linear attention with an Estimated Attention mask (Lee et al., ICLR 2024).

Every query's attention row is first *estimated* cheaply, in a compressed form of
T_M bins (the predictor length), then a few bins are kept and exact softmax attention runs on their
keys only. The steps follow the paper:

  1. linear estimate   causal FAVOR+ (ReLU kernel) over [positions, values]
  2. encode            e = GELU(LayerNorm(Linear(concat(c, v))))
  3. decode            a small causal CNN turns e into compressed scores s_hat (an option
                       beyond the paper adds each bin's mean logit q . mean(k): pooled_keys)
  4. probabilities     p_hat = softmax(s_hat) over the T_M bins
  5. grouped top-k     keep the best bins of all heads together, a budget per row
  6. decompress        kept bins -> key ranges, a flat list of (batch, head, row, key)
  7. sparse attention  exact softmax over the kept keys, times a gate
  8. mix               with the running mean of the values, by a second gate

Shapes: B batch, H heads, T sequence, D head dim, T_M bins, R query rows of a chunk.
At inference nothing here is T x T but the helpers for the loss and pictures at the
bottom: the rows go a chunk at a time, each chunk handing the next the state it needs
(the same state that decoding one token at a time keeps). Training runs step 7 as a
masked dense softmax, as the distillation loss is T x T anyway. `python sea.py` walks
through the steps on a small input.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class SEAConfig:
    k: int = 64  # kept keys per query per head on long rows
    t_m: int = 256  # T_M, the predictor length: bins per compressed attention row
    nbf: float = 8  # Performer feature factor: m = int(D * ln(D) / nbf) random features
    query_chunk: int = 128  # query rows per step at inference, all eight steps (bounds memory; on a
    # CPU smaller chunks are also faster: their gathered keys stay in cache)
    use_kernel: Optional[bool] = None  # Triton steps 5-7 (kernel.py): None = on CUDA at inference
    pooled_keys: bool = False  # beyond the paper: add each bin's mean logit q . mean(k) to s_hat
    sinks: int = 4  # the sink-window control: the first keys every row keeps (StreamingLLM's attention sinks)
    sink_bin: bool = False  # beyond the paper: every head keeps the bin holding key 0, within the budget

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


def full_precision(x):
    """x in at least float32 (float64 stays float64): SEA's estimate runs in full precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# -----------------------------------------------------------------------------
# step 1: causal FAVOR+ linear attention with the ReLU kernel

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


def causal_linear_attention(phi_q, phi_k, v, sums=None, chunk=128):
    """c_i = phi(q_i)^T S_i / phi(q_i)^T z_i, S_i = sum_{j<=i} phi(k_j) v_j^T, z_i = sum_{j<=i} phi(k_j).

    phi_q, phi_k (B, H, T, m), v (B, H, T, E) -> (B, H, T, E), and the sums (S, z) after the
    last row. Chunk by chunk: inside a chunk a small causal (chunk x chunk) product, across
    chunks the carried sums S (B, H, m, E) and z (B, H, m), which start from `sums` when the
    rows continue earlier ones (decoding).
    """
    B, H, T, m = phi_q.shape
    S, z = sums if sums is not None else (phi_q.new_zeros(B, H, m, v.size(-1)), phi_q.new_zeros(B, H, m))
    out = []
    for start in range(0, T, chunk):
        q, k, u = (t[:, :, start:start + chunk] for t in (phi_q, phi_k, v))
        local = (q @ k.transpose(-2, -1)).tril()  # (B, H, c, c), causal inside the chunk
        numerator = local @ u + q @ S
        denominator = local.sum(-1) + (q @ z.unsqueeze(-1)).squeeze(-1)
        out.append(numerator / denominator.unsqueeze(-1))
        S = S + k.transpose(-2, -1) @ u
        z = z + k.sum(-2)
    return torch.cat(out, dim=2), (S, z)


class PerformerAttention(nn.Module):
    """The Performer baseline: causal FAVOR+ (ReLU kernel) used as the attention itself."""

    def __init__(self, head_dim, nbf):
        super().__init__()
        self.features = ReLUFeatures(head_dim, nbf)

    def forward(self, q, k, v, need_weights=False):
        return self.extend(q, k, v, 0, None)[0], {}

    def extend(self, q, k, v, start, sums):
        """Decoding: the rows start .. start + R - 1 (q (B, H, R, D)), k and v of every position
        so far, the prefix sums of the rows before (None at the start) -> (out, sums)."""
        with torch.autocast(q.device.type, enabled=False):
            q, k, v = full_precision(q), full_precision(k[:, :, start:]), full_precision(v[:, :, start:])
            out, sums = causal_linear_attention(self.features(q), self.features(k), v, sums)
        return out.to(v.dtype), sums


# -----------------------------------------------------------------------------
# step 3: the compressed-score decoder

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


# -----------------------------------------------------------------------------
# steps 5-6: the kept-bin budget, bins as key ranges, decompression

def row_budget(rows, n_head, k, t_m):
    """Step 5: query row i keeps n_i = clamp(round(H * k * T_M / (i + 1)), 1, H * T_M) bins."""
    return torch.round(n_head * k * t_m / (rows.double() + 1)).long().clamp(1, n_head * t_m)


def bin_edges(rows, t_m):
    """(R, T_M + 1): bin c of row i holds keys [edges[c], edges[c + 1]).

    Key j <= i falls in bin c(i, j) = floor((j + 0.5) * T_M / (i + 1)), so bin c starts at
    the first j with (2j + 1) T_M >= 2 c (i + 1): ceil((2c(i + 1) - T_M) / 2M), which for
    j >= 0 is floor((2c(i + 1) + T_M - 1) / 2M). kernel.py computes the same in Triton.
    """
    c = torch.arange(t_m + 1, device=rows.device)
    return (2 * c * (rows[:, None] + 1) + t_m - 1) // (2 * t_m)


def bin_widths(rows, t_m):
    """(R, T_M): how many keys each bin of each row holds (0 for the empty bins of short rows)."""
    return bin_edges(rows, t_m).diff(dim=1)


def grouped_topk(p_hat, rows, k):
    """Step 5: keep the top n_i of the H * T_M cells of each row, across heads together.

    p_hat (B, H, R, T_M) -> keep (B, H, R, T_M) bool. Bins that hold no key (rows shorter
    than T_M) are ranked last, so short rows with a large budget come out dense.
    """
    B, H, R, T_M = p_hat.shape
    empty = bin_widths(rows, T_M) == 0  # (R, T_M)
    cells = p_hat.masked_fill(empty, -1.0).transpose(1, 2).reshape(B, R, H * T_M)
    budget = row_budget(rows, H, k, T_M)  # (R,)
    top = rank_keys(cells).topk(int(budget.max()), dim=-1).indices  # (B, R, n_max)
    in_budget = torch.arange(top.size(-1), device=rows.device) < budget[:, None]  # (R, n_max)
    keep = torch.zeros(B, R, H * T_M, dtype=torch.bool, device=rows.device)
    keep.scatter_(-1, top, in_budget.expand(B, R, -1))
    return keep.view(B, R, H, T_M).transpose(1, 2)


def rank_keys(cells):
    """(..., C) probabilities, -1 for empty cells -> unique int64 keys in the same order, ties to the
    lower cell (the x4 upsample makes bins tie in groups of four, and ties must go the same way
    however many rows a chunk holds). kernel.select_bins ranks by the same keys."""
    C = cells.size(-1)
    bits = cells.float().clamp_min(0).view(torch.int32).long() + 1  # p >= 0: its bits order like p
    value = torch.where(cells < 0, 0, bits)  # empty cells rank last
    return value * C + (C - 1 - torch.arange(C, device=cells.device))


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


# -----------------------------------------------------------------------------
# step 7: sparse attention on the kept keys (pure PyTorch, O(kept keys) memory)

def sparse_attention(q, k, v, keep, row0):
    """Softmax attention of query rows row0 .. row0 + R - 1 over their kept keys only.

    q (B, H, R, D) those rows' queries; k, v (B, H, T, D); keep (B, H, R, T_M). Returns
    (B, H, R, D), at least float32; a head that kept no bin in a row gets zeros there (the
    running-mean gate carries it).
    Each kept cell's key range is gathered as one block of W keys (W = the widest bin,
    the extra slots masked), so scores and outputs are small batched matmuls.
    """
    B, H, R, _ = keep.shape
    D = k.size(-1)
    b, h, r, start, length = decompress(keep, torch.arange(row0, row0 + R, device=q.device))
    slot = torch.arange(int(length.max()), device=q.device)  # (W,)
    in_bin = slot < length[:, None]  # (cells, W)
    head = b * H + h  # which (batch, head) slice of q, k, v
    key_pos = start[:, None] + torch.where(in_bin, slot, 0)  # (cells, W) key positions
    # flatten(0, 1) is a view even when k, v are the first rows of longer tensors: no copy of all keys
    keys = full_precision(k.flatten(0, 1)[head[:, None], key_pos])  # (cells, W, D)
    values = full_precision(v.flatten(0, 1)[head[:, None], key_pos])
    queries = full_precision(q.flatten(0, 1)[head, r])  # (cells, D)
    scores = (keys @ queries[:, :, None]).squeeze(-1).masked_fill(~in_bin, float("-inf"))  # (cells, W)

    # one softmax per (batch, head, row) across all of its cells
    segment = head * R + r
    n_segments = B * H * R
    row_max = scores.new_full((n_segments,), float("-inf"))
    row_max = row_max.scatter_reduce(0, segment, scores.detach().amax(-1), "amax")
    weights = torch.exp(scores - row_max[segment, None])  # masked slots give exp(-inf) = 0
    total = scores.new_zeros(n_segments).index_add(0, segment, weights.sum(-1))
    probs = weights / total[segment, None]
    cell_out = (probs[:, None, :] @ values).squeeze(1)  # (cells, D)
    return scores.new_zeros(n_segments, D).index_add(0, segment, cell_out).view(B, H, R, D)


def masked_attention(q, k, v, mask):
    """Step 7 as a dense softmax under a kept-key mask (B, H, R, T), for the query rows q
    (B, H, R, D): sparse_attention's numbers, but with (B, H, R, T) scores. Training uses it
    (the distillation loss builds T x T maps anyway, and one large matmul trains faster than
    many small gathered blocks), and so does the window control."""
    q, k, v = full_precision(q), full_precision(k), full_precision(v)
    scores = (q @ k.transpose(-2, -1)).masked_fill(~mask, torch.finfo(q.dtype).min)
    # a finite fill keeps gradients finite; rows that kept no key come out as zeros
    probs = scores.softmax(-1) * mask.any(-1, keepdim=True)
    return probs @ v


# -----------------------------------------------------------------------------
# the modules model.py plugs in: SEA, and the sliding-window control

class GrowingRows:
    """(B, H, n, D) rows appended along dim 2 to a buffer that doubles when full, so n rows cost
    O(n) however many appends bring them: a decoding cache's keys and values (model.LayerCache),
    the keys' prefix sums of the pooled-key option (KeyPrefixSums)."""

    def __init__(self):
        self.buffer, self.length = None, 0

    def append(self, rows):  # (B, H, r, D) -> every row so far
        end = self.length + rows.size(2)
        if self.buffer is None or end > self.buffer.size(2):
            bigger = rows.new_empty(*rows.shape[:2], 2 * end, rows.size(3))
            if self.buffer is not None:
                bigger[:, :, :self.length] = self.buffer[:, :, :self.length]
            self.buffer = bigger
        self.buffer[:, :, self.length:end] = rows
        self.length = end
        return self.rows()

    def rows(self):  # every row so far, (B, H, n, D)
        return self.buffer[:, :, :self.length]


class KeyPrefixSums:
    """prefix[j] = k_0 + ... + k_{j-1}, (B, H, T + 1, D), for pooled_key_scores. Each chunk of rows
    and each decoding step appends the sums of its keys (GrowingRows), so a pass over T rows costs
    O(T D) however it is cut (the sums redone per chunk would cost O(T^2 D / chunk))."""

    def __init__(self, k):  # the first rows' keys (B, H, R, D); gradients flow through these sums
        self.prefix = GrowingRows()
        self.prefix.append(F.pad(full_precision(k).cumsum(2), (0, 0, 1, 0)))  # (B, H, R + 1, D)

    def extend(self, k):  # the next rows' keys (B, H, R, D), at inference
        self.prefix.append(self.sums()[:, :, -1:] + full_precision(k).cumsum(2))
        return self

    def sums(self):  # (B, H, T + 1, D)
        return self.prefix.rows()


class DecodingState(NamedTuple):
    """What a SEA or window layer keeps between decoding steps besides the keys and values
    (decoding): the linear estimate's prefix sums, the last rows of e that the causal
    CNN reaches (HALO), the running sum of the values and, for SEA with pooled keys, the keys'
    prefix sums."""
    sums: tuple  # (S (B, H, m, 2D), z (B, H, m))
    e_tail: torch.Tensor  # (B, H, <= HALO, 2D)
    v_sum: torch.Tensor  # (B, H, 1, D)
    key_prefix: Optional[KeyPrefixSums]


GATE_OPEN = 40.0  # sigmoid(40) rounds to 1 in float64: 1 - 4e-18


class GatedSparseAttention(nn.Module):
    """What SEA and its window control share: the linear estimate and the encoder (steps 1-2),
    which feed the gates, the gate g0 of step 7 and the running-mean mix of step 8. A subclass
    decides which keys each query keeps (`attend_rows`)."""

    def __init__(self, n_head, head_dim, max_positions, cfg):
        super().__init__()
        self.n_head, self.cfg = n_head, cfg
        D = head_dim
        self.features = ReLUFeatures(D, cfg.nbf)
        self.positions = nn.Parameter(torch.randn(max_positions, D))  # P, step 1
        self.encoder = nn.Sequential(nn.Linear(3 * D, 2 * D), nn.LayerNorm(2 * D), nn.GELU())
        self.gates = nn.Linear(2 * D, 2)  # (g0, g1), steps 7-8
        nn.init.constant_(self.gates.bias, 3.0)  # sigmoid(3) = 0.95: start close to plain sparse attention

    def open_gates(self):
        """Gates fully open, sigmoid(g0) = sigmoid(g1) = 1 exactly (in float32 and float64): the output is
        then the exact softmax over the kept keys, with no running mean. For the training-free
        comparisons, where a pretrained model's attention is only swapped, never trained."""
        with torch.no_grad():
            self.gates.weight.zero_()
            self.gates.bias.fill_(GATE_OPEN)
        return self

    def encode(self, q, k, v, start=0, sums=None):
        """Steps 1-2 for the rows start .. start + R - 1 (q, k, v (B, H, R, D)): e (B, H, R, 2D)
        from the linear estimate over [positions, values], and its prefix sums after them."""
        B, H, R, D = v.shape
        q, k, v = full_precision(q), full_precision(k), full_precision(v)
        positions = self.positions[start:start + R].expand(B, H, R, D).to(v.dtype)
        c, sums = causal_linear_attention(self.features(q), self.features(k), torch.cat([positions, v], -1), sums,
                                          chunk=self.linear_chunk(q))
        return self.encoder(torch.cat([c, v], dim=-1)), sums  # f = [c, v] (B, H, R, 3D) -> e

    def forward(self, q, k, v, need_weights=False):
        """q (already scaled), k, v (B, H, T, D) -> out (B, H, T, D), aux.

        aux: kept_per_head (B, H, T), the keys each head kept in each row; with need_weights
        also kept_mask (B, H, T, T), and what the subclass adds for losses and pictures.
        All rows at once when the T x T mask is wanted anyway (training, pictures); else in
        chunks of rows, each carrying the DecodingState to the next, so memory stays O(T).
        """
        # full precision whatever autocast is on outside: the kept keys must not depend on it
        with torch.autocast(q.device.type, enabled=False):
            if need_weights or (torch.is_grad_enabled() and q.requires_grad):
                out, aux, _ = self.attend(q, k, v, materialize=True)
                return out, aux if need_weights else {"kept_per_head": aux["kept_per_head"]}
            out, aux, _ = self.attend_in_chunks(q, k, v, 0, None)
        return out, aux

    def extend(self, q, k, v, start, state):
        """Decoding, one token or a few at a time: the rows start .. start + R - 1 (q (B, H, R, D)), given k
        and v of every position so far and the DecodingState of the rows before (None at the
        start). Returns (out (B, H, R, D), the state after these rows): the same numbers as the
        rows of one full pass."""
        with torch.autocast(q.device.type, enabled=False):
            out, _, state = self.attend_in_chunks(q, k, v, start, state)
        return out, state

    def attend_in_chunks(self, q, k, v, start, state):
        """attend, a chunk of rows at a time (chunk_rows), passing the state along."""
        outs, kept = [], []
        R, step = q.size(2), self.chunk_rows(q)
        for first in range(0, R, step):
            end = start + min(first + step, R)  # keys and values up to the chunk's last row
            out, aux, state = self.attend(q[:, :, first:first + step], k[:, :, :end], v[:, :, :end],
                                          False, start + first, state)
            outs.append(out)
            kept.append(aux["kept_per_head"])
        return torch.cat(outs, dim=2), {"kept_per_head": torch.cat(kept, dim=2)}, state

    def chunk_rows(self, q):
        """Query rows per step at inference: SEAConfig.query_chunk bounds the memory."""
        return self.cfg.query_chunk

    def linear_chunk(self, q):
        """Rows per block of the linear attention's prefix sums (step 1)."""
        return 128

    def attend(self, q, k, v, materialize, start=0, state=None):
        """All eight steps for the rows start .. T - 1 (q (B, H, R, D), k, v (B, H, T, D),
        T = start + R): (out, aux, the DecodingState after them). A full pass is start = 0 with
        no state. materialize: build the (B, H, R, T) kept-key mask (training, pictures)."""
        R, T = q.size(2), k.size(2)
        new_v = full_precision(v[:, :, start:])
        e, sums = self.encode(q, k[:, :, start:], new_v, start, None if state is None else state.sums)
        e_rows = e if state is None else torch.cat([state.e_tail, e], dim=2)  # the decoder's halo rows too
        e_start = start - (e_rows.size(2) - R)  # the position of e_rows' first row
        key_prefix = self.key_prefix(k[:, :, start:], None if state is None else state.key_prefix)
        context, aux = self.attend_rows(q, k, v, e_rows, e_start, start, materialize, key_prefix)  # steps 3-7
        g0, g1 = torch.sigmoid(full_precision(self.gates(e))).split(1, dim=-1)  # (B, H, R, 1) each
        v_sum = new_v.cumsum(dim=2) + (0 if state is None else state.v_sum)  # sum of v_j, j <= i
        running_mean = v_sum / torch.arange(start + 1, T + 1, device=v.device)[:, None]
        out = g1 * g0 * context + (1 - g1) * running_mean  # steps 7 (the gate) and 8
        state = DecodingState(sums, e_rows[:, :, -CompressedScoreDecoder.HALO:], v_sum[:, :, -1:], key_prefix)
        return out.to(v.dtype), aux, state

    def key_prefix(self, new_k, before):
        """The KeyPrefixSums after the keys new_k (B, H, R, D), given those before them (None at
        the start), where the subclass reads them; None where it does not."""
        return None

    def attend_rows(self, q, k, v, e, e_start, row0, materialize, key_prefix):
        """The query rows q (B, H, R, D) at positions row0 .. row0 + R - 1: (context (B, H, R, D)
        before the gate, aux of (B, H, R, ...) tensors). k, v hold every position up to the last
        row, e the encoded rows from position e_start on, key_prefix what key_prefix returned."""
        raise NotImplementedError


class SEAAttention(GatedSparseAttention):
    """SEA: the estimate (steps 1-4) picks the kept bins (5-6) of a sparse softmax (7)."""

    KERNEL_CHUNK = 16384  # query rows per step of the Triton path: bounds the (B, H, R, T_M) estimate

    def __init__(self, n_head, head_dim, max_positions, cfg):
        super().__init__(n_head, head_dim, max_positions, cfg)
        self.decoder = CompressedScoreDecoder(n_head, 2 * head_dim, cfg.t_m)
        if cfg.pooled_keys:
            self.pooled_scale = nn.Parameter(torch.ones(n_head, 1, 1))

    def estimate(self, q, k, v):
        """Steps 1-3 for all rows at once: the compressed scores s_hat (B, H, T, T_M)."""
        with torch.autocast(q.device.type, enabled=False):
            return self.compressed_scores(q, self.encode(q, k, v)[0], 0, 0, self.key_prefix(k, None))

    def key_prefix(self, new_k, before):
        if not self.cfg.pooled_keys:
            return None
        return KeyPrefixSums(new_k) if before is None else before.extend(new_k)

    def compressed_scores(self, q, e, e_start, row0, key_prefix):
        """Step 3 for the query rows q (B, H, R, D) from row0 on: the decoder's s_hat (B, H, R, T_M),
        which needs e (rows from position e_start on) from the HALO rows above; with
        SEAConfig.pooled_keys, plus each bin's mean logit from the KeyPrefixSums."""
        R, halo = q.size(2), CompressedScoreDecoder.HALO
        first = max(e_start, row0 - halo)
        s_hat = self.decoder(e[:, :, first - e_start:row0 + R - e_start])[:, :, -R:]
        if self.cfg.pooled_keys:
            rows = torch.arange(row0, row0 + R, device=q.device)
            s_hat = s_hat + self.pooled_scale * pooled_key_scores(q, key_prefix.sums(), rows, self.cfg.t_m)
        return s_hat

    def uses_kernel(self, q):
        """The Triton kernels (kernel.py): SEAConfig.use_kernel, by default on CUDA. They never
        need a backward pass: selection passes no gradient, and training runs step 7 masked."""
        return q.is_cuda if self.cfg.use_kernel is None else self.cfg.use_kernel

    def chunk_rows(self, q):
        return self.KERNEL_CHUNK if self.uses_kernel(q) else self.cfg.query_chunk  # the kernels: few, big steps

    def linear_chunk(self, q):
        return 1024 if self.uses_kernel(q) else 128  # on a GPU, fewer and larger matmuls

    def attend_rows(self, q, k, v, e, e_start, row0, materialize, key_prefix):
        T, T_M, R = k.size(2), self.cfg.t_m, q.size(2)
        rows = torch.arange(row0, row0 + R, device=q.device)
        s_hat = self.compressed_scores(q, e, e_start, row0, key_prefix)  # step 3
        p_hat = s_hat.detach().softmax(-1)  # step 4; the estimate learns from the estimate loss only
        if self.cfg.sink_bin:  # rank the bin of key 0 (the attention sink) first, in every head
            p_hat = p_hat.scatter(-1, key_bins(rows, 1, T_M).expand(*p_hat.shape[:-1], 1), 2.0)
        if self.uses_kernel(q):  # steps 5-7 in two Triton kernels, no host sync
            from kernel import select_bins, sparse_attention_blocks  # Triton is optional: import when used
            keep = select_bins(p_hat, row0, row_budget(rows, self.n_head, self.cfg.k, T_M))
            context = None if materialize else sparse_attention_blocks(q, k, v, keep, row0)
        else:
            keep = grouped_topk(p_hat, rows, self.cfg.k)  # step 5
            context = None if materialize else sparse_attention(q, k, v, keep, row0)  # steps 6-7
        aux = dict(kept_per_head=kept_keys_per_head(keep, rows), kept_bins=keep, scores=s_hat)
        if materialize:  # step 7 as a masked dense softmax, with the T x T mask at hand
            mask = kept_key_mask(keep, row0, T)
            aux.update(kept_mask=mask)
            context = masked_attention(q, k, v, mask)
        return context, aux


class WindowAttention(GatedSparseAttention):
    """A control: SEA's gates, mix and per-row budget, but each head keeps its most recent keys, as
    many as SEA's budget gives a head of that row on average. If SEA does no better than this, its
    estimate adds nothing. It runs as a masked dense softmax: a control for analysis, not a fast
    method."""

    def attend_rows(self, q, k, v, e, e_start, row0, materialize, key_prefix):
        B, H, T = k.shape[:3]
        rows = torch.arange(row0, row0 + q.size(2), device=q.device)
        width = window_widths(rows, H, self.cfg.k, self.cfg.t_m)  # (R,)
        mask = self.key_mask(q, k, rows, width).expand(B, H, -1, -1)  # (B, H, R, T)
        aux = dict(kept_per_head=width.expand(B, H, -1))
        if materialize:
            aux.update(kept_mask=mask)
        return masked_attention(q, k, v, mask), aux

    def key_mask(self, q, k, rows, width):
        """The keys each head of the query rows q (B, H, R, D) at positions `rows` keeps, `width` (R,) of
        them in each row: (R, T) when all heads keep the same ones, else (B, H, R, T)."""
        return recent_key_mask(rows, k.size(2), width)


class SinkWindowAttention(WindowAttention):
    """The control a pretrained model needs (StreamingLLM's layout): the first SEAConfig.sinks keys,
    where many heads of a pretrained model park their attention, plus the most recent ones, as many
    keys per (head, row) in all as the window keeps."""

    def key_mask(self, q, k, rows, width):
        return sink_window_mask(rows, k.size(2), width, self.cfg.sinks)


class PerfectEstimateAttention(GatedSparseAttention):
    """Analysis only: SEA's layout (bins, grouped top-k, budget: steps 5-7) with a perfect estimate,
    the exact attention's mass per bin, computed here from q and k (T x T work). With a pretrained
    model's own q, k, v it is the best any estimate can do with SEA's layout."""

    def attend_rows(self, q, k, v, e, e_start, row0, materialize, key_prefix):
        rows = torch.arange(row0, row0 + q.size(2), device=q.device)
        keep = perfect_estimate_bins(exact_attention(q, k, rows), rows, self.cfg.k, self.cfg.t_m)
        mask = kept_key_mask(keep, row0, k.size(2))
        aux = dict(kept_per_head=kept_keys_per_head(keep, rows), kept_bins=keep)
        if materialize:
            aux.update(kept_mask=mask)
        return masked_attention(q, k, v, mask), aux


class OracleAttention(WindowAttention):
    """Analysis only: as many keys per (head, row) as the window keeps, but each head's own top keys
    by the exact attention (T x T work): the best choice of that many keys."""

    def key_mask(self, q, k, rows, width):
        rank = exact_attention(q, k, rows).argsort(-1, descending=True).argsort(-1)  # (B, H, R, T), 0: top key
        return (rank < width[:, None]) & causal_mask(rows, k.size(2))


def exact_attention(q, k, rows):
    """softmax(q k^T) of the query rows q (B, H, R, D) at positions `rows` over keys j <= i, in float32:
    (B, H, R, T). The dense teacher's maps (model.py) and the analysis kinds' choice of keys."""
    scores = (q @ k.transpose(-2, -1)).float()
    return scores.masked_fill(~causal_mask(rows, k.size(2)), float("-inf")).softmax(-1)


def perfect_estimate_bins(probs, rows, k, t_m):
    """Step 5 run on the attention itself: each (head, bin) cell's mass of probs (B, H, R, T), the grouped
    top-k over them -> kept bins (B, H, R, T_M)."""
    B, H, R, T = probs.shape
    mass = probs.new_zeros(B, H, R, t_m).scatter_add_(-1, key_bins(rows, T, t_m).expand(B, H, R, T), probs)
    return grouped_topk(mass, rows, k)


def pooled_key_scores(q, prefix, rows, t_m):
    """q_i . (mean of the keys in bin c of row i) for the query rows q (B, H, R, D) at positions
    `rows`: (B, H, R, T_M), 0 for empty bins. An option beyond the paper (SEAConfig.pooled_keys):
    it tells the estimate which bins hold keys the query matches. From the keys' prefix sums
    (KeyPrefixSums: prefix[j] sums keys 0..j-1): O(min(T, T_M D) D) work a row, whatever T."""
    q = full_precision(q)
    B, H, R, D = q.shape
    edges = bin_edges(rows, t_m)  # (R, T_M + 1)
    if prefix.size(2) <= edges.size(1) * D:  # q_i . prefix[j] for all j, (B, H, R, T + 1), is the smaller
        at_edges = (q @ prefix.transpose(-2, -1)).gather(-1, edges.expand(B, H, R, -1))
    else:  # long rows: the prefix rows at the edges, (B, H, R, T_M + 1, D), dotted with q_i
        at_edges = torch.einsum("bhrd,bhred->bhre", q, prefix[:, :, edges])
    return at_edges.diff(dim=-1) / edges.diff(dim=-1).clamp_min(1)


def window_widths(rows, n_head, k, t_m):
    """Keys per head of each row for the window control: SEA's budget n_i spread evenly over the
    heads. A row holds E_i = min(i + 1, T_M) non-empty bins of (i + 1) / E_i keys each; it keeps
    min(n_i, H E_i) cells, so a head keeps min(n_i, H E_i) (i + 1) / (H E_i) keys on average."""
    filled = torch.clamp(rows + 1, max=t_m)
    cells = torch.minimum(row_budget(rows, n_head, k, t_m), n_head * filled)
    return torch.round(cells * (rows + 1) / (n_head * filled)).long().clamp(1)


def kept_keys_per_head(kept_bins, rows):
    """(B, H, R, T_M) kept bins of rows `rows` -> (B, H, R): keys each head keeps in each row."""
    widths = bin_widths(rows, kept_bins.size(-1))  # (R, T_M)
    return (kept_bins.long() * widths).sum(-1)


# -----------------------------------------------------------------------------
# T x T views: for the masks of training, the estimate loss, tests and pictures

def key_bins(rows, T, t_m):
    """(R, T) long: bin c(i, j) = floor((j + 0.5) T_M / (i + 1)) of key j in row i (j > i clipped)."""
    i = rows[:, None]
    j = torch.arange(T, device=rows.device)[None, :]
    return (((2 * j + 1) * t_m) // (2 * (i + 1))).clamp(max=t_m - 1)


def causal_mask(rows, T):
    """(R, T) bool: key j is visible from row i when j <= i."""
    return torch.arange(T, device=rows.device)[None, :] <= rows[:, None]


def recent_key_mask(rows, T, width):
    """(R, T) bool: the `width` (R,) most recent keys j <= i of each row i."""
    j = torch.arange(T, device=rows.device)[None, :]
    return causal_mask(rows, T) & (j > (rows - width)[:, None])


def sink_window_mask(rows, T, width, sinks):
    """(R, T) bool: of the `width` (R,) keys of each row i, the first min(sinks, width) keys of the
    sequence and the rest the most recent keys j <= i."""
    first = torch.clamp(width, max=sinks)
    j = torch.arange(T, device=rows.device)[None, :]
    return causal_mask(rows, T) & ((j < first[:, None]) | (j > (rows - width + first)[:, None]))


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


def estimate_loss(scores, target):
    """SEA's estimate loss, 0.1 KL(target || estimate) + MSE(estimate, target), computed per bin.

    The estimated map (estimated_attention_map) gives every key of bin c of row i the probability
    exp(s_c) / Z_i, Z_i = sum_c w_c exp(s_c), w_c the keys in bin c: so log(estimate) is a
    log_softmax, and both terms need only each bin's key count w and teacher mass a:
        KL  = sum_j t_j log t_j - sum_c a_c log p_c           (per row, averaged over rows)
        MSE = sum_c w_c p_c^2 - 2 sum_c a_c p_c + sum_j t_j^2  (summed, over all T x T entries)
    scores (B, H, T, T_M) s_hat; target (B, H, T, T) causal probabilities. Equal to the same terms
    on the (B, H, T, T) estimated map, without building it.
    """
    B, H, T, T_M = scores.shape
    rows = torch.arange(T, device=scores.device)
    bins = key_bins(rows, T, T_M).expand(B, H, T, T)
    visible = causal_mask(rows, T).to(target.dtype)
    w = torch.zeros(T, T_M, dtype=target.dtype, device=scores.device).scatter_add_(-1, bins[0, 0], visible)
    a = torch.zeros_like(scores, dtype=target.dtype).scatter_add_(-1, bins, target)  # future keys: 0 mass
    scores = full_precision(scores)
    log_p = scores - torch.logsumexp(scores + w.clamp_min(1e-30).log(), dim=-1, keepdim=True)
    p = log_p.exp()
    entropy_part = torch.xlogy(target, target).sum(-1)  # (B, H, T)
    kl = (entropy_part - (a * log_p).sum(-1)).mean()
    squared = (w * p * p).sum(-1) - 2 * (a * p).sum(-1) + (target * target).sum(-1)
    return 0.1 * kl + squared.sum() / (B * H * T * T)


# -----------------------------------------------------------------------------
# python sea.py: the eight steps on a small random input, with their shapes

def walk_through(B=1, H=2, T=48, D=16, cfg=SEAConfig(k=2, t_m=16), rows=(3, 11, 23, 47)):
    """Run SEAAttention once and print what each step produced, then a few rows' budgets and kept keys."""
    torch.manual_seed(0)
    attention = SEAAttention(H, D, T, cfg).eval()
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
    with torch.no_grad():
        out, aux = attention(q, k, v, need_weights=True)
    for hook in hooks:
        hook.remove()
    m = attention.features.W.size(0)
    b, h, r, start, length = decompress(aux["kept_bins"], torch.arange(T))
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
        ("7 sparse attention", "(g0, g1)", shapes["gates"][1].shape, "softmax over kept keys, times sigmoid(g0)"),
        ("8 mix", "out", out.shape, "sigmoid(g1) * sparse + (1 - sigmoid(g1)) * running mean of v"),
    ]
    print(f"SEA on a random input: B={B} H={H} T={T} D={D}, T_M={cfg.t_m}, k={cfg.k}\n")
    for step, name, shape, note in steps:
        print(f"{step:<20} {name:<16} {str(tuple(shape)):<18} {note}")
    budget = row_budget(torch.arange(T), H, cfg.k, cfg.t_m)
    print(f"\nrow i sees keys 0..i; it keeps n_i = round(H k T_M / (i + 1)) of its H x T_M cells (step 5):")
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
