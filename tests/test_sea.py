import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import ANALYSIS_KINDS, ATTENTION_KINDS, Decoder, DecoderConfig
import sea
from controls import CONTROLS, OracleAttention, PerfectEstimateAttention, SinkWindowAttention, WindowAttention
from sea import (CompressedScoreDecoder, KeptKeys, KeyBlocks, SEAAttention, SEAConfig, bin_targets, bin_widths,
                 causal_linear_attention, decompress, estimate_loss, estimated_attention_map, spread_bonus, grouped_topk,
                 kept_key_mask, masked_attention, row_budget, sparse_attention)


def formula_key_mask(keep):
    """Step 6 by the letter of the paper: key j <= i is kept by head h iff bin c(i, j) was kept."""
    B, H, T, T_M = keep.shape
    mask = torch.zeros(B, H, T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(i + 1):
            mask[:, :, i, j] = keep[:, :, i, math.floor((j + 0.5) * T_M / (i + 1))]
    return mask


def formula_key_bins(T, T_M):
    """(T, T): floor((j + 0.5) T_M / (i + 1)) for keys j <= i, by the letter."""
    return torch.tensor([[min(T_M - 1, math.floor((j + 0.5) * T_M / (i + 1))) for j in range(T)] for i in range(T)])


def masked_dense_attention(q, k, v, mask):
    """The naive reference: dense scores, boolean mask, softmax; rows with no key give zeros."""
    scores = (q @ k.transpose(-2, -1)).masked_fill(~mask, float("-inf"))
    return scores.softmax(-1).nan_to_num() @ v


def random_keep(B, H, T, T_M, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return grouped_topk(torch.rand(B, H, T, T_M, generator=gen), torch.arange(T), k)


def masked_attention_of_bins(q, k, v, keep, row0):
    return masked_attention(q, k, v, kept_key_mask(keep, row0, k.size(2)))


def sparse_attention_of_bins(q, k, v, keep, row0):
    return sparse_attention(q, k, v, KeptKeys.of_bins(keep, torch.arange(row0, row0 + q.size(2))))


def sparse_attention_in_small_pieces(q, k, v, keep, row0, monkeypatch):
    monkeypatch.setattr(sea, "GATHERED_FLOATS", 5 * 4 * q.size(-1))  # 5 cells of the widest (4 keys): rows cut apart
    return sparse_attention_of_bins(q, k, v, keep, row0)


@pytest.mark.parametrize("step7", [sparse_attention_of_bins, sparse_attention_in_small_pieces,
                                   masked_attention_of_bins])
def test_sparse_paths_equal_dense_masked_reference_with_gradients(step7, monkeypatch):
    if step7 is sparse_attention_in_small_pieces:
        step7 = lambda *args, row0: sparse_attention_in_small_pieces(*args, row0, monkeypatch)  # noqa: E731
    torch.manual_seed(0)
    B, H, T, D, T_M, k = 2, 3, 50, 8, 16, 3
    q, kk, v = (torch.randn(B, H, T, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    keep = random_keep(B, H, T, T_M, k)
    keep[0, 1, 30] = False  # a head that keeps nothing in a row gives zeros there
    ours = step7(q, kk, v, keep, row0=0)
    reference = masked_dense_attention(q, kk, v, formula_key_mask(keep))
    assert ours[0, 1, 30].abs().max() == 0
    torch.testing.assert_close(ours, reference)
    grad = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, (q, kk, v), grad)
    reference_grads = torch.autograd.grad(reference, (q, kk, v), grad)
    for a, b in zip(ours_grads, reference_grads):
        torch.testing.assert_close(a, b)


def test_kept_keys_of_bins_runs_and_masks_give_the_same_keys():
    torch.manual_seed(0)
    B, H, T, T_M = 2, 3, 40, 8
    keep = random_keep(B, H, T, T_M, 2)[:, :, 10:]  # rows 10 .. 39
    rows = torch.arange(10, T)
    of_bins = KeptKeys.of_bins(keep, rows)
    mask = kept_key_mask(keep, 10, T)
    assert torch.equal(of_bins.mask(T), mask)
    assert torch.equal(KeptKeys.of_mask(mask).mask(T), mask)
    assert torch.equal(of_bins.per_head(), mask.sum(-1))
    runs = [(rows - 4, torch.full_like(rows, 3)), (torch.zeros_like(rows), rows % 3)]  # keys i-4..i-2, then 0..
    expected = torch.zeros(len(rows), T, dtype=torch.bool)
    for r, i in enumerate(rows.tolist()):
        expected[r, i - 4:i - 1] = True
        expected[r, :i % 3] = True
    of_runs = KeptKeys.of_runs(B, H, runs)
    assert torch.equal(of_runs.mask(T), expected.expand(B, H, -1, -1))
    assert torch.equal(of_runs.per_head(), expected.sum(-1).expand(B, H, -1))


def test_decompression_keys_are_causal_and_follow_the_bins():
    B, H, T, T_M, k = 1, 2, 80, 8, 2
    keep = random_keep(B, H, T, T_M, k, seed=1)
    b, h, r, start, length = decompress(keep, torch.arange(T))
    assert (start >= 0).all() and (start + length <= r + 1).all()  # keys 0..i only
    mask = torch.zeros(B, H, T, T, dtype=torch.bool)
    for cell in range(len(start)):
        keys = slice(start[cell], start[cell] + length[cell])
        assert not mask[b[cell], h[cell], r[cell], keys].any()  # no key listed twice
        mask[b[cell], h[cell], r[cell], keys] = True
    assert torch.equal(mask, formula_key_mask(keep))


def test_short_rows_dense_long_rows_about_k():
    B, H, T, T_M, k = 2, 4, 512, 32, 8
    keep = random_keep(B, H, T, T_M, k, seed=2)
    mask = formula_key_mask(keep)
    per_head = mask.sum(-1).float()  # (B, H, T)
    for i in range(T):
        if (i + 1) ** 2 <= k * T_M:
            assert mask[:, :, i, :i + 1].all(), f"row {i} should be dense"
    late = per_head[:, :, 256:].mean(dim=(0, 2))  # mean per head over long rows
    assert late.mean().item() == pytest.approx(k, rel=0.15)


def test_kept_bins_per_row_equal_the_budget_formula():
    B, H, T, T_M, k = 2, 3, 300, 16, 4
    keep = random_keep(B, H, T, T_M, k, seed=3)
    kept = keep.sum(dim=(1, 3))  # (B, T) kept (head, bin) cells per row
    expected = [max(1, min(H * T_M, round(H * k * T_M / (i + 1)))) for i in range(T)]
    assert kept.tolist() == [expected] * B
    assert row_budget(torch.arange(T), H, k, T_M).tolist() == expected


def test_grouped_topk_equals_a_stable_sort_of_each_rows_cells():
    """Step 5 against its definition, row by row: the budget's first cells of a stable descending sort (ties to the
    lower cell; empty bins last), on rows whose budgets span many of budget_thresholds' groups, with many ties."""
    B, H, T, T_M, k = 2, 3, 300, 16, 4
    p_hat = torch.randint(0, 5, (B, H, T, T_M), generator=torch.Generator().manual_seed(5)).float() / 4
    rows = torch.arange(T)
    budget = row_budget(rows, H, k, T_M)
    cells = p_hat.masked_fill(bin_widths(rows, T_M) == 0, -1.0).transpose(1, 2).reshape(B, T, H * T_M)
    expected = torch.zeros(B, T, H * T_M, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            expected[b, i, cells[b, i].sort(descending=True, stable=True).indices[:budget[i]]] = True
    expected = expected.view(B, T, H, T_M).transpose(1, 2)
    assert torch.equal(grouped_topk(p_hat, rows, k), expected)
    assert torch.equal(grouped_topk(p_hat[:, :, 200:], rows[200:], k), expected[:, :, 200:])  # a later chunk alone


def test_causal_linear_attention_matches_quadratic_form():
    torch.manual_seed(0)
    phi_q, phi_k, v = torch.rand(2, 3, 45, 5), torch.rand(2, 3, 45, 5), torch.randn(2, 3, 45, 7)
    weights = (phi_q @ phi_k.transpose(-2, -1)).tril()
    reference = weights @ v / weights.sum(-1, keepdim=True)
    torch.testing.assert_close(causal_linear_attention(phi_q, phi_k, v, block=16)[0], reference)
    first, sums = causal_linear_attention(phi_q[:, :, :20], phi_k[:, :, :20], v[:, :, :20], block=8)  # carried on
    rest, _ = causal_linear_attention(phi_q[:, :, 20:], phi_k[:, :, 20:], v[:, :, 20:], sums, block=8)
    torch.testing.assert_close(torch.cat([first, rest], dim=2), reference)
    phi_k.requires_grad_(True)  # 45 rows fill blocks of 16 with 3 rows past the end: the gradient stays finite
    weights = (phi_q @ phi_k.transpose(-2, -1)).tril()
    expected, = torch.autograd.grad((weights @ v / weights.sum(-1, keepdim=True)).sum(), phi_k)
    grad, = torch.autograd.grad(causal_linear_attention(phi_q, phi_k, v, block=16)[0].sum(), phi_k)
    torch.testing.assert_close(grad, expected)


def test_sea_attention_module_steps_7_and_8():
    torch.manual_seed(0)
    B, H, T, D = 2, 3, 40, 8
    attention = SEAAttention(H, D, 64, SEAConfig(k=3, t_m=16)).double()
    q, kk, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))
    out, aux = attention(q, kk, v, need_weights=True)
    g0, g1 = torch.sigmoid(attention.gates(attention.encode(q, kk, v, 0)[0])).unbind(-1)
    sparse = masked_dense_attention(q, kk, v, formula_key_mask(aux["kept_bins"]))
    running_mean = v.cumsum(2) / torch.arange(1, T + 1, dtype=torch.float64)[:, None]
    expected = g1[..., None] * g0[..., None] * sparse + (1 - g1[..., None]) * running_mean
    torch.testing.assert_close(out, expected)
    estimate = estimated_attention_map(aux["scores"])
    torch.testing.assert_close(estimate.sum(-1), torch.ones(B, H, T, dtype=torch.float64))
    assert estimate.triu(1).abs().max() == 0


@pytest.mark.parametrize("kind, estimator", [(SEAAttention, "paper"), (SEAAttention, "residual"),
                                             *((kind, "paper") for kind in CONTROLS.values())])
@pytest.mark.parametrize("chunk", [20, 13, 100])  # divides T = 100, does not, one chunk
def test_inference_chunks_equal_the_masked_dense_pass(kind, estimator, chunk):
    torch.manual_seed(0)
    cfg = SEAConfig(k=3, t_m=16, query_chunk=chunk, estimator=estimator)
    attention = kind(2, 8, 128, cfg).double().eval()
    q, kk, v = (torch.randn(2, 2, 100, 8, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        chunked, chunked_aux = attention(q, kk, v)  # sparse step 7, chunk by chunk
        whole, whole_aux = attention(q, kk, v, need_weights=True)  # all rows, step 7 under the T x T mask
    torch.testing.assert_close(chunked, whole)
    assert torch.equal(chunked_aux["kept_per_head"], whole_aux["kept_mask"].sum(-1))
    reference = masked_dense_attention(q, kk, v, whole_aux["kept_mask"])  # the naive softmax over those keys
    g0, g1 = torch.sigmoid(attention.gates(attention.encode(q, kk, v, 0)[0])).unbind(-1)
    running_mean = v.cumsum(2) / torch.arange(1, 101, dtype=torch.float64)[:, None]
    torch.testing.assert_close(chunked, g1[..., None] * g0[..., None] * reference + (1 - g1[..., None]) * running_mean)


def test_rows_with_few_keys_run_step_7_masked_with_the_same_numbers():
    torch.manual_seed(0)
    attention = SEAAttention(2, 8, 128, SEAConfig(k=3, t_m=16, query_chunk=30)).double().eval()
    q, kk, v = (torch.randn(2, 2, 100, 8, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        sparse = attention(q, kk, v)[0]
        attention.FEW_KEYS = 60  # the first two chunks masked, the others sparse
        torch.testing.assert_close(attention(q, kk, v)[0], sparse)


@pytest.mark.parametrize("training", [True, False])
def test_autocast_does_not_change_sea(training):
    torch.manual_seed(0)
    attention = SEAAttention(2, 8, 64, SEAConfig(k=3, t_m=16)).train(training)
    q, kk, v = (torch.randn(2, 2, 60, 8) for _ in range(3))
    plain, plain_aux = attention(q, kk, v, need_weights=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, mixed_aux = attention(q, kk, v, need_weights=True)
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed_aux["kept_bins"], plain_aux["kept_bins"])
    torch.testing.assert_close(mixed, plain)


@pytest.mark.parametrize("attn,family,training", [(attn, "tiny", training) for attn in ("sea", "performer")
                                                   for training in (True, False)]
                         + [(attn, "tiny-llama", False) for attn in ATTENTION_KINDS + ANALYSIS_KINDS])
def test_whole_model_is_causal(attn, family, training):
    torch.manual_seed(0)
    sea = SEAConfig(k=2, t_m=8, query_chunk=7)
    model = Decoder(DecoderConfig.preset(family, n_layer=2, block_size=48, attn=attn, sea=sea)).train(training)
    x = torch.randint(0, 50257, (2, 48))
    p = 29
    y = torch.cat([x[:, :p + 1], torch.randint(0, 50257, (2, 48 - p - 1))], dim=1)
    with torch.no_grad():
        a, b = model(x)[0], model(y)[0]
    torch.testing.assert_close(a[:, :p + 1], b[:, :p + 1])
    assert not torch.allclose(a[:, p + 1:], b[:, p + 1:])


@pytest.mark.parametrize("bad", [dict(k=0), dict(t_m=30), dict(t_m=0),
                                 dict(nbf=0)])
def test_config_validation(bad):
    with pytest.raises(ValueError, match="SEAConfig"):
        SEAConfig(**bad)


def test_running_sea_py_walks_through_the_eight_steps():
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, str(root / "sea.py")], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for step in ("1 linear estimate", "2 encode", "3 decode", "4 probabilities", "5 grouped top-k",
                 "6 decompress", "7 sparse attention", "8 mix"):
        assert any(line.startswith(step) for line in lines), step
    assert "(1, 2, 48, 16)" in result.stdout  # s_hat (B, H, T, T_M)
    assert sum(line.startswith("row ") and "keys kept" in line for line in lines) == 4


def test_window_control_keeps_each_heads_most_recent_keys():
    torch.manual_seed(0)
    B, H, T, D, T_M, k = 2, 3, 90, 8, 16, 2
    attention = WindowAttention(H, D, 128, SEAConfig(k=k, t_m=T_M, query_chunk=32)).double()
    q, kk, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))
    out, aux = attention(q, kk, v, need_weights=True)
    for i in range(T):
        budget = max(1, min(H * T_M, round(H * k * T_M / (i + 1))))
        filled = min(i + 1, T_M)
        width = max(1, round(min(budget, H * filled) * (i + 1) / (H * filled)))
        expected = torch.zeros(T, dtype=torch.bool)
        expected[i + 1 - width:i + 1] = True
        assert torch.equal(aux["kept_mask"][:, :, i], expected.expand(B, H, T)), f"row {i}"
        assert (aux["kept_per_head"][:, :, i] == width).all()
    assert aux["kept_per_head"][:, :, 64:].double().mean().item() == pytest.approx(k, rel=0.2)
    g0, g1 = torch.sigmoid(attention.gates(attention.encode(q, kk, v, 0)[0])).unbind(-1)
    sparse = masked_dense_attention(q, kk, v, aux["kept_mask"])
    running_mean = v.cumsum(2) / torch.arange(1, T + 1, dtype=torch.float64)[:, None]
    torch.testing.assert_close(out, g1[..., None] * g0[..., None] * sparse + (1 - g1[..., None]) * running_mean)
    with torch.no_grad():  # inference runs in chunks of query_chunk rows: the same numbers
        torch.testing.assert_close(attention.eval()(q, kk, v)[0], out)


def direct_estimate_loss(scores, target):
    """The estimate loss on the (B, H, T, T) estimated map itself: bins spread to keys, log_softmax."""
    B, H, T, T_M = scores.shape
    spread = scores.gather(-1, formula_key_bins(T, T_M).expand(B, H, T, T))
    log_estimate = spread.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).log_softmax(-1)
    torch.testing.assert_close(log_estimate.exp(), estimated_attention_map(scores))
    kl = (torch.xlogy(target, target) - torch.where(target > 0, target * log_estimate, 0.0)).sum(-1).mean()
    return 0.1 * kl + F.mse_loss(log_estimate.exp(), target)


def test_estimate_loss_per_bin_equals_the_direct_computation():
    torch.manual_seed(0)
    B, H, T, T_M = 2, 3, 70, 16
    scores = torch.randn(B, H, T, T_M, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(B, H, T, T, dtype=torch.float64) * 3
    target = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    ours, direct = estimate_loss(scores, bin_targets(target, torch.arange(T), T_M)), direct_estimate_loss(scores, target)
    torch.testing.assert_close(ours, direct)
    torch.testing.assert_close(torch.autograd.grad(ours, scores)[0], torch.autograd.grad(direct, scores)[0])



@pytest.mark.parametrize("size", [1, 3, 8])
def test_key_blocks_are_each_blocks_mean_key_and_channel_variance_however_they_grow(size):
    torch.manual_seed(0)
    B, H_kv, T, D = 2, 2, 50, 8
    k = 20 + torch.randn(B, H_kv, T, D)  # float32 keys far from 0: a block's variance is a small difference
    count = T // size
    blocks = k[:, :, :count * size].double().view(B, H_kv, count, size, D)
    mean, variance = KeyBlocks().moments(k, size, count)
    torch.testing.assert_close(mean, blocks.mean(3).float())
    torch.testing.assert_close(variance, blocks.var(3, unbiased=False).float())
    grown = KeyBlocks()
    grown.moments(k[:, :, :8], size + 1, 8 // (size + 1))  # another block size first: started over
    for last in [2, 9, 10, T]:  # the keys a few at a time, as chunks and decoding steps bring them
        later = grown.moments(k[:, :, :last], size, last // size)
    assert torch.equal(later[0], mean) and torch.equal(later[1], variance)  # however the blocks came


def test_the_spread_bonus_is_never_above_what_logits_of_that_variance_can_give():
    torch.manual_seed(0)
    for n in (2, 3, 8):
        logits = 6 * torch.randn(500, n, dtype=torch.float64)  # spread enough that the cap binds
        gap = logits.logsumexp(-1) - math.log(n) - logits.mean(-1)  # what the bonus estimates
        variance = logits.var(-1, unbiased=False)
        bonus = spread_bonus(variance, n)
        capped = bonus < variance / 2  # the normal's variance / 2 (an estimate, not a bound) is too much there
        assert capped.sum() > 300 and (bonus <= variance / 2).all() and (gap[capped] <= bonus[capped] + 1e-9).all()
        one_above = torch.tensor([math.sqrt(n - 1)] + [-1 / math.sqrt(n - 1)] * (n - 1), dtype=torch.float64)
        worst = 10 * one_above  # one logit far above the rest: the bound is reached
        torch.testing.assert_close(spread_bonus(worst.var(unbiased=False), n), worst.logsumexp(0) - math.log(n))
    assert spread_bonus(torch.tensor([3.0]), 1).tolist() == [0.0] and spread_bonus(torch.tensor([0.5]), 1000).tolist() == [0.25]


def test_decoder_upsamples_after_the_1x1_convolution_with_the_same_numbers():
    torch.manual_seed(0)
    decoder = CompressedScoreDecoder(3, 16, 32).double()
    e = torch.randn(2, 3, 40, 16, dtype=torch.float64)
    B, H, T, _ = e.shape
    x = decoder.project(e).view(B, H, T, 2, 8).permute(0, 1, 3, 2, 4).reshape(B, 2 * H, T, 8)
    x = F.relu(decoder.causal_conv(decoder.conv1, decoder.norm_in(x)))
    x = F.relu(decoder.causal_conv(decoder.conv2, x))
    literal = decoder.norm_out(decoder.to_heads(x.repeat_interleave(4, dim=-1)))  # the paper's order
    torch.testing.assert_close(decoder(e), literal)


def test_sink_window_keeps_the_first_keys_and_the_most_recent():
    torch.manual_seed(0)
    B, H, T, D, T_M, k, sinks = 1, 2, 70, 8, 16, 2, 3
    attention = SinkWindowAttention(H, D, 128, SEAConfig(k=k, t_m=T_M, sinks=sinks)).double()
    q, kk, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))
    _, aux = attention(q, kk, v, need_weights=True)
    window = WindowAttention(H, D, 128, SEAConfig(k=k, t_m=T_M)).double()
    counts = window(q, kk, v, need_weights=True)[1]["kept_per_head"]
    assert torch.equal(aux["kept_per_head"], counts)  # the same count per (head, row) as the window
    for i in range(T):
        width = int(counts[0, 0, i])
        first = min(sinks, width)
        expected = torch.zeros(T, dtype=torch.bool)
        expected[:first] = True
        expected[i + 1 - (width - first):i + 1] = True  # the most recent width - first keys
        assert torch.equal(aux["kept_mask"][0, :, i], expected.expand(H, T)), f"row {i}"
        assert int(aux["kept_mask"][0, 0, i].sum()) == width


def test_the_sink_bin_option_keeps_key_0_in_every_head_within_the_same_budget():
    torch.manual_seed(0)
    B, H, T, D = 2, 3, 60, 8
    cfg = SEAConfig(k=4, t_m=16, query_chunk=7)  # every row's budget holds at least H cells
    plain, with_sink = SEAAttention(H, D, 64, cfg).eval(), SEAAttention(H, D, 64, replace(cfg, sink_bin=True)).eval()
    with_sink.load_state_dict(plain.state_dict())
    q, kk, v = (torch.randn(B, H, T, D) for _ in range(3))
    with torch.no_grad():
        base, sinks = plain(q, kk, v, need_weights=True)[1], with_sink(q, kk, v, need_weights=True)[1]
        chunked = with_sink(q, kk, v)[0]
    assert sinks["kept_mask"][..., 0].all() and not base["kept_mask"][..., 0].all()
    kept_cells = lambda aux: aux["kept_bins"].sum(dim=(1, 3))  # (B, T): cells per row, all heads
    assert torch.equal(kept_cells(sinks), kept_cells(base))
    torch.testing.assert_close(chunked, with_sink(q, kk, v, need_weights=True)[0])


@pytest.mark.parametrize("kind", [SEAAttention, SinkWindowAttention, PerfectEstimateAttention, OracleAttention])
def test_open_gates_give_the_exact_softmax_over_the_kept_keys(kind):
    torch.manual_seed(0)
    B, H, T, D = 2, 3, 50, 8
    attention = kind(H, D, 64, SEAConfig(k=2, t_m=8, query_chunk=7)).double().open_gates().eval()
    q, kk, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        out, aux = attention(q, kk, v, need_weights=True)
        chunked = attention(q, kk, v)[0]  # inference: a chunk of rows at a time
    exact = masked_dense_attention(q, kk, v, aux["kept_mask"])
    assert aux["kept_mask"][:, :, 30:].float().mean() < 0.5  # sparse: the running mean would show
    torch.testing.assert_close(out, exact)
    torch.testing.assert_close(chunked, exact)


def test_the_oracle_and_the_perfect_estimate_choose_by_the_exact_attention():
    torch.manual_seed(0)
    B, H, T, D, T_M, k = 1, 2, 40, 8, 8, 2
    q, kk, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))
    probs = (q @ kk.transpose(-1, -2)).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    oracle = OracleAttention(H, D, 64, SEAConfig(k=k, t_m=T_M)).double()
    aux = oracle(q, kk, v, need_weights=True)[1]
    for i in (10, 39):
        width = int(aux["kept_per_head"][0, 0, i])
        top = probs[0, :, i].topk(width).indices
        assert torch.equal(aux["kept_mask"][0, :, i].nonzero()[:, 1].view(H, width).sort().values, top.sort().values)
    perfect = PerfectEstimateAttention(H, D, 64, SEAConfig(k=k, t_m=T_M)).double()
    aux = perfect(q, kk, v, need_weights=True)[1]
    mass = torch.zeros(B, H, T, T_M, dtype=torch.float64).scatter_add_(-1, formula_key_bins(T, T_M).expand(B, H, T, T), probs)
    assert torch.equal(aux["kept_bins"], grouped_topk(mass, torch.arange(T), k))
