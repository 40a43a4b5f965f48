"""The Triton kernel against sea.sparse_attention; on a CPU under the Triton interpreter."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before kernel.py's @triton.jit runs
triton = pytest.importorskip("triton")

from kernel import sparse_attention_triton  # noqa: E402
from sea import SEAAttention, SEAConfig, grouped_topk, sparse_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def random_inputs(B, H, T, D, M, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, kk, v = (torch.randn(B, H, T, D, generator=gen).to(DEVICE, dtype) for _ in range(3))
    keep = grouped_topk(torch.rand(B, H, T, M, generator=gen), torch.arange(T), k).to(DEVICE)
    return q, kk, v, keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [32, 64, 128])
def test_kernel_matches_pytorch_path(dtype, D):
    # T = 75 is no multiple of the key block; early rows are dense, later ones sparse
    q, k, v, keep = random_inputs(1, 2, 75, D, 16, 3, dtype)
    expected = sparse_attention(q, k, v, keep, row0=0)
    got = sparse_attention_triton(q, k, v, keep, row0=0, block_n=16)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_single_key_rows_empty_heads_and_offset_rows():
    q, k, v, _ = random_inputs(2, 3, 90, 32, 8, 2, torch.float32, seed=1)
    R, row0 = 20, 70  # a chunk of rows 70..89, as SEAAttention runs at inference
    keep = torch.zeros(2, 3, R, 8, dtype=torch.bool)
    keep[0, 0, :, 0] = True  # bin 0 of a long row: a range of keys
    keep[1, 2, :, 7] = True  # the last bin: holds the diagonal key
    keep[0, 1, 5, 3] = True  # a lone bin in one row; every other (b, h, row) keeps nothing
    keep[1, 0, :, :] = True  # a whole row: dense
    keep = keep.to(DEVICE)
    expected = sparse_attention(q, k, v, keep, row0)
    got = sparse_attention_triton(q, k, v, keep, row0, block_n=8)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert got[0, 2].abs().max() == 0  # a head with no kept bin gives zeros

    one_key = torch.zeros(1, 1, 1, 8, dtype=torch.bool, device=DEVICE)
    one_key[..., 4] = True  # row 0 has a single key, j = 0, in bin floor(0.5 * M) = 4
    torch.testing.assert_close(sparse_attention_triton(q[:1, :1], k[:1, :1], v[:1, :1], one_key, 0),
                               v[:1, :1, :1].float())


def test_sea_attention_uses_kernel_when_forced():
    torch.manual_seed(0)
    attention = SEAAttention(2, 32, 64, SEAConfig(k=2, predictor_length=8, query_chunk=16)).to(DEVICE).eval()
    q, k, v = (torch.randn(1, 2, 40, 32, device=DEVICE) for _ in range(3))
    with torch.no_grad():
        attention.cfg.use_kernel = False
        reference, _ = attention(q, k, v)
        attention.cfg.use_kernel = True
        fused, _ = attention(q, k, v)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no backward"):
        attention(q.requires_grad_(), k, v)


def test_unsupported_head_dim_is_refused():
    q, k, v, keep = random_inputs(1, 1, 8, 16, 8, 2, torch.float32)
    with pytest.raises(ValueError, match="head dims"):
        sparse_attention_triton(q, k, v, keep, 0)
