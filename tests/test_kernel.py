"""The Triton kernels against sea.py's PyTorch path; on a CPU under the Triton interpreter."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before kernel.py's @triton.jit runs
triton = pytest.importorskip("triton")

from kernel import select_bins, sparse_attention_blocks  # noqa: E402
from sea import KeptKeys, SEAAttention, SEAConfig, grouped_topk, row_budget, sparse_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def random_probabilities(B, H, R, T_M, seed=0):
    """Softmaxed random scores, with bins tied in groups of four as the x4 upsample makes them."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, H, R, T_M // 4, generator=gen).repeat_interleave(4, dim=-1)
    scores[..., :T_M // 2] = torch.randn(B, H, R, T_M // 2, generator=gen)  # and some bins without ties
    return scores.softmax(-1).to(DEVICE)


@pytest.mark.parametrize("row0,R,k", [(0, 75, 3), (40, 33, 2), (300, 20, 1), (0, 12, 64)])
def test_selection_kernel_equals_grouped_topk(row0, R, k):
    # row0 0: short dense rows with empty bins; 40 / 300: chunks that start mid-sequence, where
    # one head may take the whole budget; k = 64: every cell of every row
    H, T_M = 3, 16
    p_hat = random_probabilities(2, H, R, T_M, seed=row0)
    rows = torch.arange(row0, row0 + R, device=DEVICE)
    kept = select_bins(p_hat, row0, row_budget(rows, H, k, T_M))
    expected = grouped_topk(p_hat, rows, k)
    assert torch.equal(kept, expected)
    assert torch.equal(kept.sum(dim=(1, 3)), row_budget(rows, H, k, T_M).expand(2, -1))


def random_inputs(B, H, T, D, T_M, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, kk, v = (torch.randn(B, H, T, D, generator=gen).to(DEVICE, dtype) for _ in range(3))
    keep = grouped_topk(torch.rand(B, H, T, T_M, generator=gen).to(DEVICE), torch.arange(T, device=DEVICE), k)
    return q, kk, v, keep


def pytorch_path(q, k, v, keep, row0):
    """Step 7 of sea.py on the kept bins of the query rows q, rows row0 .. row0 + R - 1."""
    return sparse_attention(q, k, v, KeptKeys.of_bins(keep, torch.arange(row0, row0 + q.size(2), device=q.device)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [32, 64, 128])
def test_block_kernel_matches_pytorch_path(dtype, D):
    # T = 75 is no multiple of the 16-row / 16-key blocks; early rows are dense, later ones sparse
    q, k, v, keep = random_inputs(1, 2, 75, D, 16, 3, dtype)
    expected = pytorch_path(q, k, v, keep, row0=0)
    got = sparse_attention_blocks(q, k, v, keep, row0=0, block_m=16, block_n=16)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_block_kernel_single_keys_empty_heads_and_offset_rows():
    q, k, v, _ = random_inputs(2, 3, 90, 32, 8, 2, torch.float32, seed=1)
    R, row0 = 20, 70  # a chunk of rows 70..89, as SEAAttention runs at inference
    keep = torch.zeros(2, 3, R, 8, dtype=torch.bool)
    keep[0, 0, :, 0] = True  # bin 0 of a long row: a range of keys
    keep[1, 2, :, 7] = True  # the last bin: holds the diagonal key
    keep[0, 1, 5, 3] = True  # a lone bin in one row; every other (b, h, row) keeps nothing
    keep[1, 0, :, :] = True  # a whole row: dense
    keep = keep.to(DEVICE)
    rows = q[:, :, row0:]
    expected = pytorch_path(rows, k, v, keep, row0)
    got = sparse_attention_blocks(rows, k, v, keep, row0, block_m=16, block_n=16)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert got[0, 2].abs().max() == 0  # a head with no kept bin gives zeros

    one_key = torch.zeros(1, 1, 1, 8, dtype=torch.bool, device=DEVICE)
    one_key[..., 4] = True  # row 0 has a single key, j = 0, in bin floor(0.5 * T_M) = 4
    torch.testing.assert_close(sparse_attention_blocks(q[:1, :1, :1], k[:1, :1], v[:1, :1], one_key, 0,
                                                       block_m=16, block_n=16), v[:1, :1, :1].float())


def test_block_kernel_reads_shared_key_value_heads_in_place():
    """Grouped-query attention: 4 query heads on 2 key/value heads, the keys and values a slice of a
    longer buffer (as a decoding cache is), read where they lie; equal to the heads repeated."""
    q, _, _, keep = random_inputs(1, 4, 75, 32, 16, 3, torch.float32, seed=2)
    buffer = torch.randn(2, 1, 2, 100, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    k, v = buffer[:, :, :, :75]  # (1, 2, 75, 32) each, not contiguous
    got = sparse_attention_blocks(q, k, v, keep, row0=0, block_m=16, block_n=16)
    repeated = lambda x: x.repeat_interleave(2, dim=1)
    expected = sparse_attention_blocks(q, repeated(k), repeated(v), keep, row0=0, block_m=16, block_n=16)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got, pytorch_path(q, k, v, keep, row0=0), rtol=1e-4, atol=1e-4)


def test_sea_attention_with_kernels_equals_the_pytorch_path():
    torch.manual_seed(0)
    attention = SEAAttention(2, 32, 96, SEAConfig(k=2, t_m=8, query_chunk=16)).to(DEVICE).eval()
    attention.KERNEL_CHUNK = 32  # several chunks, the later ones mid-sequence
    q, k, v = (torch.randn(1, 2, 70, 32, device=DEVICE) for _ in range(3))
    with torch.no_grad():
        attention.cfg.use_kernel = False
        reference, reference_aux = attention(q, k, v)
        attention.cfg.use_kernel = True
        fused, fused_aux = attention(q, k, v)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
    assert torch.equal(fused_aux["kept_per_head"], reference_aux["kept_per_head"])
    # training: the selection kernel picks the bins (no gradient passes there), step 7 runs masked
    grads = []
    for use_kernel in (False, True):
        attention.cfg.use_kernel = use_kernel
        leaf = q.clone().requires_grad_()
        attention.train()(leaf, k, v)[0].square().sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0])


def test_unsupported_head_dim_is_refused():
    q, k, v, keep = random_inputs(1, 1, 8, 16, 8, 2, torch.float32)
    with pytest.raises(ValueError, match="head dims"):
        sparse_attention_blocks(q, k, v, keep, 0)


def test_the_kernel_path_never_waits_for_the_device():
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    attention = SEAAttention(2, 32, 96, SEAConfig(k=2, t_m=8, use_kernel=True)).to(DEVICE).eval()
    q, k, v = (torch.randn(1, 2, 70, 32, device=DEVICE) for _ in range(3))
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        attention(q, k, v)
    synchronizing = {"aten::nonzero", "aten::item", "aten::_local_scalar_dense"}  # sizes read back to the host
    assert not synchronizing & {event.name for event in prof.events()}
