"""
The Performer baseline (Choromanski et al.): causal FAVOR+ with the ReLU kernel used as the attention
itself, the linear attention that SEA's step 1 uses only to estimate (sea.causal_linear_attention).
"""

import torch
import torch.nn as nn

from sea import ReLUFeatures, causal_linear_attention, full_precision, query_heads


class PerformerAttention(nn.Module):
    """The Performer baseline: causal FAVOR+ (ReLU kernel) used as the attention itself."""

    ROWS_PER_CALL = 4096  # rows per causal_linear_attention call: bounds its (block x block) products

    def __init__(self, head_dim, nbf):
        super().__init__()
        self.features = ReLUFeatures(head_dim, nbf)

    def forward(self, q, k, v, need_weights=False):
        return self.extend(q, k, v, 0, None)[0], {}

    def extend(self, q, k, v, row0, sums):
        """Decoding: the rows row0 .. row0 + R - 1 (q (B, H, R, D)), k and v of every position
        so far, the prefix sums of the rows before (None at the start) -> (out, sums)."""
        with torch.autocast(q.device.type, enabled=False):
            q = full_precision(q)
            k, v = (query_heads(full_precision(x[:, :, row0:]), q.size(1)) for x in (k, v))  # the new rows
            outs = []
            for first in range(0, q.size(2), self.ROWS_PER_CALL):
                rows = slice(first, first + self.ROWS_PER_CALL)
                out, sums = causal_linear_attention(self.features(q[:, :, rows]), self.features(k[:, :, rows]),
                                                    v[:, :, rows], sums)
                outs.append(out)
        return torch.cat(outs, dim=2).to(v.dtype), sums
