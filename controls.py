"""
The controls: other ways to choose the keys each query attends, in SEA's frame (the same gates,
mix, sparse step 7 and budget, sea.GatedSparseAttention), so that a comparison with SEA isolates
its estimate. Each says only which keys a (head, row) keeps (choose_keys); none is trained.

    window          each head's most recent keys
    sink-window     the first SEAConfig.sinks keys (StreamingLLM's attention sinks) + the most recent
    block-mean      fixed blocks of SEAConfig.block keys, scored by q . (the block's mean key) (MoBA)
    block-bound     the same blocks, scored by Quest's bound sum_c max(q_c kmax_c, q_c kmin_c)
    sea-heuristic   SEA's bins, budget and grouped top-k, each bin scored from the keys with no learned
                    part (sea.heuristic_bin_scores): the row a learned SEA estimate must beat; with
                    SEAConfig.finalists > 1 its likeliest cells rescored exactly (sea.rescore_finalists)

For analysis only (they read the exact T x T attention, which a cheap method cannot):

    perfect-estimate  SEA's layout with the exact attention's mass per bin: the best any estimate can do
    oracle            each head's own top keys by the exact attention

The window, sink-window and block controls keep as many keys per (head, row) as SEA's budget gives
a head of that row on average (window_widths); SEA and sea-heuristic share that budget across heads.
"""

import torch
import torch.nn.functional as F

from sea import (DecodingState, GatedSparseAttention, KeptBins, KeptKeys, KeyRanges, bin_mass, causal_mask,
                 estimated_bin_shares, exact_attention, full_precision, grouped_matmul, grouped_topk,
                 heuristic_bin_scores, heuristic_block_size, heuristic_row_scores, rescore_finalists, row_budget,
                 row_cell_budget, row_layout, row_sparse_attention)


def window_widths(rows, n_head, keys_per_head, t_m):
    """Keys per head of each row for the window control: SEA's budget n_i spread evenly over the
    heads. A row holds E_i = min(i + 1, T_M) non-empty bins of (i + 1) / E_i keys each; it keeps
    min(n_i, H E_i) cells, so a head keeps min(n_i, H E_i) (i + 1) / (H E_i) keys on average."""
    filled = torch.clamp(rows + 1, max=t_m)
    cells = torch.minimum(row_budget(rows, n_head, keys_per_head, t_m), n_head * filled)
    return torch.round(cells * (rows + 1) / (n_head * filled)).long().clamp(1)


# -----------------------------------------------------------------------------
# recent keys

class WindowAttention(GatedSparseAttention):
    """Each head keeps its most recent keys, as many as SEA's budget gives a head of that row on
    average. If SEA does no better than this, its estimate adds nothing."""

    def choose_keys(self, q, k, e, rows, key_blocks):
        width = window_widths(rows, self.n_head, self.cfg.k, self.cfg.t_m)  # (R,)
        return KeptKeys.of_runs(q.size(0), self.n_head, self.runs(rows, width)), {}

    def runs(self, rows, width):
        """[(start (R,), length (R,)), ...]: the runs of keys every head of the rows `rows` keeps, `width` in all."""
        return [(rows - width + 1, width)]


class SinkWindowAttention(WindowAttention):
    """The control a pretrained model needs (StreamingLLM's layout): the first SEAConfig.sinks keys,
    where many heads of a pretrained model park their attention, plus the most recent ones, as many
    keys per (head, row) in all as the window keeps."""

    def runs(self, rows, width):
        sinks = torch.clamp(width, max=self.cfg.sinks)
        return [(torch.zeros_like(rows), sinks), (rows - width + sinks + 1, width - sinks)]


# -----------------------------------------------------------------------------
# fixed blocks of keys, scored without training

class BlockMeanAttention(GatedSparseAttention):
    """MoBA's selection: the keys cut into fixed blocks of SEAConfig.block from key 0; each head of
    row i keeps block 0 (the sink) and its own block (the one holding key i), and fills the budget
    with the other blocks whose score is highest. Every key j <= i of a kept block is attended."""

    def choose_keys(self, q, k, e, rows, key_blocks):
        size = self.cfg.block
        width = window_widths(rows, self.n_head, self.cfg.k, self.cfg.t_m)  # (R,) keys per (head, row)
        own = rows // size  # (R,) the block holding key i
        count = torch.maximum(-(-width // size), 1 + (own > 0).long())  # (R,) blocks kept; block 0 and own always
        scores = self.block_scores(full_precision(q), full_precision(k))  # (B, H, R, blocks)
        block = torch.arange(scores.size(-1), device=q.device)
        forced = (block == 0) | (block == own[:, None])  # (R, blocks)
        scores = scores.masked_fill(forced, float("inf")).masked_fill(block > own[:, None], float("-inf"))
        top = scores.topk(int(count.max()), dim=-1).indices  # (B, H, R, n), best first
        b, h, r, rank = (torch.arange(top.size(-1), device=q.device) < count[:, None]).expand(top.shape).nonzero(
            as_tuple=True)
        start = top[b, h, r, rank] * size
        length = torch.clamp(rows[r] + 1 - start, max=size)  # the own block stops at key i
        return KeyRanges(tuple(top.shape[:3]), b, h, r, start, length), {}

    def block_scores(self, q, k):
        """q (B, H, R, D), k (B, H_kv, T, D) -> (B, H, R, blocks): q_i . (the mean key of each block). Only
        complete blocks are ever ranked (block 0 and the own block are kept outright)."""
        return grouped_matmul(q, key_blocks(k, self.cfg.block).mean(3).transpose(-2, -1))


class BlockBoundAttention(BlockMeanAttention):
    """Quest's selection on the same blocks: the score of a block is an upper bound on q_i . k_j over
    its keys, sum_c max(q_c kmax_c, q_c kmin_c), with kmax, kmin the per-channel max and min of its keys."""

    def block_scores(self, q, k):
        blocks = key_blocks(k, self.cfg.block)  # (B, H_kv, blocks, size, D)
        kmax, kmin = blocks.amax(3), blocks.amin(3)  # (B, H_kv, blocks, D)
        # max(q_c kmax_c, q_c kmin_c) is q_c kmax_c where q_c >= 0, else q_c kmin_c: two matmuls
        return grouped_matmul(F.relu(q), kmax.transpose(-2, -1)) - grouped_matmul(F.relu(-q), kmin.transpose(-2, -1))


def key_blocks(k, size):
    """k (B, H_kv, T, D) -> (B, H_kv, ceil(T / size), size, D); the last block padded with copies of the last key
    (only ever a row's own block, which is kept without a score)."""
    B, H, T, D = k.shape
    padded = F.pad(k, (0, 0, 0, -T % size), mode="replicate") if T % size else k
    return padded.view(B, H, -1, size, D)


# -----------------------------------------------------------------------------
# SEA's layout with an estimate that needs no training

class HeuristicBinAttention(GatedSparseAttention):
    """SEA's bins, budget and grouped top-k (steps 5-6), the cells ranked by the heuristic estimate of
    their mass (sea.heuristic_bin_scores: the logits' mean and spread over fixed blocks of keys in the middle
    bins, the exact logits of the first and last). What SEA's residual estimator is before any training."""

    def uses_key_blocks(self):
        return True

    def choose_keys(self, q, k, e, rows, key_blocks):
        with torch.no_grad():  # a choice: no gradient passes it
            s_hat = heuristic_bin_scores(q, k, key_blocks, rows, self.cfg.t_m, self.cfg.sub_bins, self.cfg.overlap)
        return self.keep(s_hat, q, k, rows)

    def keep(self, s_hat, q, k, rows):
        if self.cfg.finalists > 1:  # the likeliest cells rescored from their keys first
            inexact = heuristic_block_size(rows, self.cfg.t_m * self.cfg.sub_bins) > 1  # blocks of one key: exact
            s_hat = rescore_finalists(s_hat, q, k, rows, self.cfg.k, self.cfg.finalists, inexact)
        bins = self.keep_bins(estimated_bin_shares(s_hat, rows), q, k, rows)
        return KeptBins(bins, rows), dict(kept_bins=bins)

    def extend(self, q, k, v, row0, state):
        """Decoding: a step of one row with open gates (the training-free use) is decode_row; any other, the
        eight steps in chunks. Whether the gates are open is read from the state (open gates keep no running sum
        of the values), not from the gates' weights: no operator call."""
        if q.size(2) > 1 or state is None or self.uses_kernel(q) or state.v_sum is not None:
            return super().extend(q, k, v, row0, state)
        with torch.autocast(q.device.type, enabled=False):
            return self.decode_row(q, k, v, row0, state)

    def decode_row(self, q, k, v, row, state):
        """The row `row` (q (B, H, 1, D); k, v (B, H_kv, row + 1, D)) in few operator calls: the heuristic's
        scores (heuristic_row_scores, the block moments grown when a block completes) and steps 4-7
        (row_sparse_attention), with the row's layout and budgets worked out on the host once for every layer.
        The same numbers as attend_chunk's (tested); returns (out (B, H, 1, D), the state after the row)."""
        cfg = self.cfg
        with torch.no_grad():
            s_hat = heuristic_row_scores(q, k, state.key_blocks, row, cfg.t_m, cfg.sub_bins, cfg.overlap)
        layout = row_layout(row, cfg.t_m, cfg.sub_bins, q.device, cfg.overlap)
        budget = row_cell_budget(row, self.n_head, cfg.k, cfg.t_m)
        finalists = row_cell_budget(row, self.n_head, cfg.finalists * cfg.k, cfg.t_m) if cfg.finalists > 1 else 0
        context = row_sparse_attention(q, k, v, s_hat, layout, budget, finalists)
        return context.to(v.dtype), state


# -----------------------------------------------------------------------------
# analysis only: the exact attention chooses

class PerfectEstimateAttention(GatedSparseAttention):
    """SEA's layout (bins, grouped top-k, budget: steps 5-7) with a perfect estimate, the exact
    attention's mass per bin, computed here from q and k (T x T work). With a pretrained model's own
    q, k, v it is the best any estimate can do with SEA's layout."""

    def choose_keys(self, q, k, e, rows, key_blocks):
        bins = perfect_estimate_bins(exact_attention(q, k, rows), rows, self.cfg.k, self.cfg.t_m)
        return KeptBins(bins, rows), dict(kept_bins=bins)


class OracleAttention(GatedSparseAttention):
    """As many keys per (head, row) as the window keeps, but each head's own top keys by the exact
    attention (T x T work): the best choice of that many keys."""

    def choose_keys(self, q, k, e, rows, key_blocks):
        width = window_widths(rows, self.n_head, self.cfg.k, self.cfg.t_m)  # (R,)
        rank = exact_attention(q, k, rows).argsort(-1, descending=True).argsort(-1)  # (B, H, R, T), 0: top key
        return KeptKeys.of_mask((rank < width[:, None]) & causal_mask(rows, k.size(2))), {}


def perfect_estimate_bins(probs, rows, keys_per_head, t_m):
    """Step 5 run on the attention itself: each (head, bin) cell's mass of probs (B, H, R, T), the grouped
    top-k over them -> kept bins (B, H, R, T_M)."""
    return grouped_topk(bin_mass(probs, rows, t_m), rows, keys_per_head)


CONTROLS = {"window": WindowAttention, "sink-window": SinkWindowAttention, "block-mean": BlockMeanAttention,
            "block-bound": BlockBoundAttention, "sea-heuristic": HeuristicBinAttention}
ANALYSIS = {"perfect-estimate": PerfectEstimateAttention, "oracle": OracleAttention}
