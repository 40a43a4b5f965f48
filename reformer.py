"""
The Reformer baseline: LSH attention (Kitaev et al., 2020) as the SEA paper's official code runs it
(through the reformer_pytorch package: shared query/key, buckets of k tokens, 8 hash rounds), made
strictly causal.

Each query attends only to keys that land in its own hash bucket:

  1. shared query/key   the student's scaled q serves as both; keys are L2-normalised and the
                        logits are q . k_hat * D^-1/2 (k_proj is not used)
  2. hash               a random rotation R (D, n_hashes, n_buckets / 2) per forward pass; in
                        round r a vector's bucket is the argmax of [x R_r, -x R_r]
  3. sort               per round, tokens sorted by (bucket, position)
  4. attend             causal softmax over a few neighbours in the sorted order; a token's own
                        key only counts when nothing else is visible (its logit is -5e4)
  5. combine            the rounds' outputs, weighted by the softmax of their log-sum-exps

Step 4 is where we differ from the official code, which cuts the sorted order into fixed chunks
of `bucket_size` that attend to themselves and the chunk before. There a later token that hashes
to a lower bucket shifts every chunk border after it, so which earlier keys a query sees depends
on later tokens. Here a query sees the most recent keys *of its own bucket*, at most two buckets'
worth (2 x bucket_size, the reach of chunk plus previous chunk): tokens of one bucket keep their
position order in the sort, so this set depends on earlier tokens only. The official chunking is
kept as an option (ReformerConfig.official_chunks) to measure the difference. The number of
buckets is fixed by the model's length (block_size / bucket_size, what the official code gets on
full windows), so a token's bucket never depends on how long the sequence is.

Shapes: B batch, H heads (folded into the batch as G = B * H), T sequence, D head dim,
R hash rounds, c bucket size, K = T padded to whole buckets.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from sea import query_heads

SELF_LOGIT = -5e4  # a token's own key: attended only when no other key is visible


@dataclass
class ReformerConfig:
    bucket_size: int = 64  # c: the official --k 64 means buckets of 64 tokens
    n_hashes: int = 8  # R hash rounds
    n_buckets: Optional[int] = None  # default: block_size / bucket_size, at least 2, even
    official_chunks: bool = False  # the official (not strictly causal) fixed chunks of the sorted order
    eval_seed: int = 0  # rotations at evaluation come from this seed, so evaluation is repeatable

    def __post_init__(self):
        if self.bucket_size < 1 or self.n_hashes < 1:
            raise ValueError(f"ReformerConfig: bucket_size={self.bucket_size} and "
                             f"n_hashes={self.n_hashes} must be >= 1")
        if self.n_buckets is not None and not (self.n_buckets == 1 or self.n_buckets % 2 == 0):
            raise ValueError(f"ReformerConfig.n_buckets={self.n_buckets} must be 1 or even "
                             f"(a rotation gives buckets in +/- pairs)")


def hash_buckets(x, rotations):
    """x (G, T, D), rotations (D, R, n_buckets / 2) -> buckets (G, R, T): argmax of [x R, -x R]."""
    rotated = torch.einsum("gtd,drb->grtb", x, rotations)
    return torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)


class LSHAttention(nn.Module):
    def __init__(self, head_dim, max_positions, cfg):
        super().__init__()
        self.head_dim, self.cfg = head_dim, cfg
        self.n_buckets = cfg.n_buckets or max(2, 2 * (max_positions // cfg.bucket_size // 2))

    def rotations(self, device):
        """Fresh Gaussian rotations for every training pass; the same seeded ones at evaluation."""
        shape = (self.head_dim, self.cfg.n_hashes, max(1, self.n_buckets // 2))
        generator = None if self.training else torch.Generator().manual_seed(self.cfg.eval_seed)
        return torch.randn(shape, generator=generator).to(device)

    def forward(self, q, k, v, need_weights=False):
        """q (already scaled), k (unused: the keys are q), v (B, H, T, D) -> (B, H, T, D), {}.
        v may have fewer heads (grouped-query attention): each is repeated for its query heads."""
        B, H, T, D = q.shape
        v = query_heads(v, H)
        precision = torch.promote_types(v.dtype, torch.float32)  # float32, or float64 in tests
        with torch.autocast(q.device.type, enabled=False):
            out = self.attend(q.to(precision).reshape(B * H, T, D), v.to(precision).reshape(B * H, T, D))
        return out.view(B, H, T, D).to(v.dtype), {}

    def extend(self, q, k, v, row0, state):
        """Decoding: the rows row0 .. row0 + R - 1 (q (B, H, R, D)), v of every position so far,
        the shared query/keys of the earlier positions (state, None at the start). Runs the
        attention over all positions again and keeps the new rows: exact, since it is causal."""
        qk = q if state is None else torch.cat([state, q], dim=2)
        return self(qk, None, v)[0][:, :, row0:], qk

    def attend(self, qk, v):
        G, T, D = qk.shape
        c, R = self.cfg.bucket_size, self.cfg.n_hashes
        if self.n_buckets == 1:
            buckets = qk.new_zeros(G, R, T, dtype=torch.long)
        else:
            buckets = hash_buckets(qk, self.rotations(qk.device).to(qk.dtype))  # step 2
        K = math.ceil(T / c) * c
        if K > T:  # padding tokens: a bucket of their own after all others, positions after all others
            qk, v = F.pad(qk, (0, 0, 0, K - T)), F.pad(v, (0, 0, 0, K - T))
            buckets = F.pad(buckets, (0, K - T), value=self.n_buckets)
        position = torch.arange(K, device=qk.device)
        order = (buckets * K + position).argsort(dim=-1)  # step 3: (G, R, K), the position of each sorted token
        out, lse = self.attend_sorted(sort_by(qk, order), sort_by(v, order), buckets.gather(-1, order), order)  # step 4
        unsorted_out = torch.empty_like(out).scatter_(2, order[..., None].expand(-1, -1, -1, D), out)
        unsorted_lse = torch.empty_like(lse).scatter_(2, order, lse)
        weights = unsorted_lse.softmax(dim=1)  # step 5: over the R rounds
        return (weights[..., None] * unsorted_out).sum(dim=1)[:, :T]

    def attend_sorted(self, qk, v, buckets, position):
        """Causal softmax over neighbours in the sorted order, one chunk of c queries at a time.

        qk, v (G, R, K, D); buckets, position (G, R, K). Returns out (G, R, K, D) and the
        log-sum-exp (G, R, K) of each query's logits. Chunk n's queries see the keys of chunks
        n - back .. n (back = 2 here; 1 with wrap-around in the official chunking).
        """
        G, R, K, D = qk.shape
        c = self.cfg.bucket_size
        n = K // c
        back = 1 if self.cfg.official_chunks else 2
        chunk = lambda x: x.view(G, R, n, c, *x.shape[3:])
        keys_of = lambda x: look_back(chunk(x), back, wrap=self.cfg.official_chunks)  # (G, R, n, (back+1)c, ...)
        q = chunk(qk)
        keys = keys_of(F.normalize(qk, dim=-1))
        logits = q @ keys.transpose(-2, -1) * D ** -0.5  # (G, R, n, c, (back+1)c)
        q_position, k_position = chunk(position)[..., None], keys_of(position)[..., None, :]
        visible = k_position <= q_position
        if not self.cfg.official_chunks:  # the most recent 2c keys of the query's own bucket
            index = torch.arange(K, device=qk.device).expand(G, R, K)
            q_index, k_index = chunk(index)[..., None], keys_of(index)[..., None, :]
            same_bucket = chunk(buckets)[..., None] == keys_of(buckets)[..., None, :]
            visible = visible & same_bucket & (k_index >= q_index - 2 * c) & (k_index <= q_index) & (k_index >= 0)
        logits = logits.masked_fill(~visible, torch.finfo(logits.dtype).min)
        logits = logits.masked_fill(k_position == q_position, SELF_LOGIT)
        lse = logits.logsumexp(dim=-1, keepdim=True)
        out = (logits - lse).exp() @ keys_of(v)
        return out.view(G, R, K, D), lse.view(G, R, K)


def sort_by(x, order):
    """x (G, K, D) -> (G, R, K, D): the tokens in each round's sorted order (G, R, K)."""
    G, R, K = order.shape
    return x[:, None].expand(G, R, K, x.size(-1)).gather(2, order[..., None].expand(G, R, K, x.size(-1)))


def look_back(chunks, back, wrap):
    """(G, R, n, c, ...) -> (G, R, n, (back + 1) c, ...): each chunk with the `back` chunks before it.
    Without wrap the chunks before the first are padding, filled with -1 (an index, position and
    bucket that no query sees)."""
    parts = []
    for shift in range(back, 0, -1):
        if wrap:
            parts.append(chunks.roll(shift, dims=2))
        else:
            pad = torch.full_like(chunks[:, :, :shift], -1)
            parts.append(torch.cat([pad, chunks[:, :, :-shift]], dim=2))
    return torch.cat([*parts, chunks], dim=3)
