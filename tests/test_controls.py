"""The training-free controls against naive formulas, and SEA's residual estimator against its heuristic."""
import math

import pytest
import torch

from controls import BlockBoundAttention, BlockMeanAttention, HeuristicBinAttention, SinkWindowAttention, window_widths
from model import Decoder, DecoderConfig
from sea import (KeyBlocks, SEAAttention, SEAConfig, attention_bin_targets, bin_targets, causal_attention_pieces,
                 estimate_loss, estimated_bin_shares, exact_attention, grouped_topk, heuristic_bin_scores,
                 heuristic_block_size, rescore_finalists, row_budget)
import train


def naive_block_choice(q, k, i, width, size, score):
    """The keys one head of row i keeps, by the letter: blocks of `size` keys from key 0, block 0 and the
    block of key i always, then the best other complete blocks by score(q_i, the block's keys), as many
    blocks in all as ceil(width / size) (at least those two)."""
    own = i // size
    count = max(math.ceil(width / size), 2 if own > 0 else 1)
    others = sorted(range(1, own), key=lambda b: -score(q[i], k[b * size:(b + 1) * size]))
    kept = {0, own} | set(others[:count - len({0, own})])
    return {j for b in kept for j in range(b * size, min((b + 1) * size, i + 1))}


def mean_score(query, keys):
    return float(query @ keys.mean(0))


def bound_score(query, keys):
    return float(sum(max(query[c] * keys[:, c].max(), query[c] * keys[:, c].min()) for c in range(len(query))))


@pytest.mark.parametrize("kind, score", [(BlockMeanAttention, mean_score), (BlockBoundAttention, bound_score)])
@pytest.mark.parametrize("size", [4, 3])
def test_block_controls_keep_the_sink_block_the_own_block_and_the_best_others(kind, score, size):
    torch.manual_seed(0)
    B, H, T, D, T_M, k = 2, 3, 70, 8, 16, 8
    cfg = SEAConfig(k=k, t_m=T_M, block=size, query_chunk=16)
    attention = kind(H, D, 128, cfg).double().open_gates().eval()
    q, kk, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        out, aux = attention(q, kk, v, need_weights=True)
        chunked = attention(q, kk, v)[0]  # inference: chunks of 16 rows, step 7 sparse
    widths = window_widths(torch.arange(T), H, k, T_M)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                expected = naive_block_choice(q[b, h], kk[b, h], i, int(widths[i]), size, score)
                kept = set(aux["kept_mask"][b, h, i].nonzero().flatten().tolist())
                assert kept == expected, (b, h, i)
    assert aux["kept_mask"][:, :, T // 2:].float().mean() < 0.5  # late rows are sparse
    assert aux["kept_mask"].triu(1).sum() == 0  # causal
    assert torch.equal(aux["kept_per_head"], aux["kept_mask"].sum(-1))
    blocks = torch.clamp(-(-widths // size), min=2)[T // 2:]  # the budget: width / size blocks, or the two kept outright
    assert (aux["kept_per_head"][:, :, T // 2:] <= blocks * size).all()
    torch.testing.assert_close(chunked, out)


def naive_bin(i, j, T_M):
    return min(T_M - 1, math.floor((j + 0.5) * T_M / (i + 1)))


def naive_heuristic_scores(q, k, T_M, sub_bins, overlap=False):
    """(H, T, T_M) for one batch: the log of the mean of exp(q_i . k_j) over the first and last bins' keys;
    over the others', the complete blocks of b keys from key 0 (b = (i + 1) // (T_M sub_bins), at least 1)
    whose middle lies in the bin (with overlap: that hold one of its keys), each counted as its keys at
    exp(mean + variance / 2) of their logits, the variance sum_d q_d^2 Var(k_d), or if less, at the mean exp of
    as many logits of that mean and variance with one far above the rest; 0 for empty bins."""
    H, T, _ = q.shape
    scores = torch.zeros(H, T, T_M, dtype=q.dtype)
    for i in range(T):
        size = max(1, (i + 1) // (T_M * sub_bins))
        for c in range(T_M):
            keys = [j for j in range(i + 1) if naive_bin(i, j, T_M) == c]
            if not keys:
                continue
            if c in (0, T_M - 1):
                logits = torch.einsum("hd,hnd->hn", q[:, i], k[:, keys])
                scores[:, i, c] = logits.logsumexp(-1) - math.log(len(keys))
                continue
            blocks = [b for b in range(T // size) if math.floor((b * size + size / 2) * T_M / (i + 1)) == c]
            if overlap:
                blocks = [b for b in range((i + 1) // size) if c in {naive_bin(i, j, T_M) for j in range(b * size,
                                                                                                  (b + 1) * size)}]
            total = 0
            for b in blocks:
                assert (b + 1) * size <= i + 1  # a middle bin's blocks are complete
                members = k[:, b * size:(b + 1) * size]
                mean = (q[:, i] * members.mean(1)).sum(-1)
                variance = (q[:, i] ** 2 * members.var(1, unbiased=False)).sum(-1)
                spread = variance.sqrt()
                one_above = torch.stack([mean + spread * math.sqrt(size - 1)] +  # mean and variance as given
                                        [mean - spread / math.sqrt(max(size - 1, 1))] * (size - 1))
                total = total + torch.minimum(size * torch.exp(mean + variance / 2), one_above.exp().sum(0))
            scores[:, i, c] = torch.log(total / (len(blocks) * size))
    return scores


@pytest.mark.parametrize("sub_bins, T_M, overlap", [(1, 8, False), (3, 4, False), (1, 4, False), (1, 8, True),
                                                    (3, 4, True)])
def test_the_heuristic_estimate_is_exact_at_the_ends_and_pools_blocks_between(sub_bins, T_M, overlap):
    torch.manual_seed(0)
    H, T, D = 2, 70, 8
    q = torch.randn(1, H, T, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, H, T, D, dtype=torch.float64, requires_grad=True)
    rows = torch.arange(T)
    ours = heuristic_bin_scores(q, k, KeyBlocks(), rows, T_M, sub_bins, overlap)
    torch.testing.assert_close(ours[0], naive_heuristic_scores(q[0], k[0], T_M, sub_bins, overlap))
    if overlap:  # blocks across a bin's edge: some bins read more than their own blocks
        assert not torch.allclose(ours, heuristic_bin_scores(q, k, KeyBlocks(), rows, T_M, sub_bins))
    ours.sum().backward()  # distillation trains q and k through it: finite, even for the empty bins of short rows
    assert q.grad.isfinite().all() and k.grad.isfinite().all()


def test_the_heuristic_control_keeps_the_bins_of_most_estimated_mass():
    torch.manual_seed(0)
    B, H, T, D, T_M, k = 1, 3, 60, 8, 16, 2
    attention = HeuristicBinAttention(H, D, 64, SEAConfig(k=k, t_m=T_M, query_chunk=7)).double().eval()
    q, kk, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        aux = attention(q, kk, v, need_weights=True)[1]
    widths = torch.tensor([[sum(1 for j in range(i + 1) if naive_bin(i, j, T_M) == c) for c in range(T_M)]
                           for i in range(T)], dtype=torch.float64)
    mass = naive_heuristic_scores(q[0], kk[0], T_M, 4).exp() * widths  # a bin's estimated (unnormalised) mass
    mass = mass / mass.sum(-1, keepdim=True)  # each head's share of it
    assert torch.equal(aux["kept_bins"], grouped_topk(mass[None], torch.arange(T), k))


def test_the_finalists_get_their_bins_exact_scores_and_the_other_cells_keep_the_estimate():
    torch.manual_seed(0)
    H, T, D, T_M, k, finalists = 4, 70, 8, 8, 2, 2
    q = torch.randn(1, H, T, D, dtype=torch.float64)
    kk = torch.randn(1, 2, T, D, dtype=torch.float64)  # two query heads a key head
    rows = torch.arange(T)
    estimate = heuristic_bin_scores(q, kk, KeyBlocks(), rows, T_M, 1)
    inexact = heuristic_block_size(rows, T_M) > 1  # blocks of one key up to row 14: the estimate exact there
    ours = rescore_finalists(estimate, q, kk, rows, k, finalists, inexact)
    finalist = grouped_topk(estimated_bin_shares(estimate, rows), rows, finalists * k)[0]
    expected = estimate[0].clone()
    for h in range(H):
        for i in range(T):
            for c in range(T_M):
                keys = [j for j in range(i + 1) if naive_bin(i, j, T_M) == c]
                if finalist[h, i, c] and keys and inexact[i]:
                    expected[h, i, c] = (kk[0, h // 2, keys] @ q[0, h, i]).logsumexp(0) - math.log(len(keys))
    assert (finalist.sum((0, 2)) <= row_budget(rows, H, finalists * k, T_M)).all()
    assert (expected != estimate[0]).sum() > 100  # many cells rescored, and they moved
    torch.testing.assert_close(ours[0], expected)


def test_with_finalists_the_heuristic_control_ranks_them_by_their_exact_scores_in_every_path():
    torch.manual_seed(0)
    B, H, T, D, T_M, k = 1, 3, 60, 8, 8, 2
    config = SEAConfig(k=k, t_m=T_M, sub_bins=1, finalists=3, query_chunk=7)
    attention = HeuristicBinAttention(H, D, 64, config).double().open_gates().eval()
    q, kk, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))
    rows = torch.arange(T)
    with torch.no_grad():
        out, aux = attention(q, kk, v, need_weights=True)
        chunked = attention(q, kk, v)[0]  # chunks of 7 rows, step 7 sparse
    estimate = heuristic_bin_scores(q, kk, KeyBlocks(), rows, T_M, 1)
    rescored = rescore_finalists(estimate, q, kk, rows, k, 3, heuristic_block_size(rows, T_M) > 1)
    assert torch.equal(aux["kept_bins"], grouped_topk(estimated_bin_shares(rescored, rows), rows, k))
    assert not torch.equal(aux["kept_bins"], grouped_topk(estimated_bin_shares(estimate, rows), rows, k))
    torch.testing.assert_close(chunked, out)


@pytest.mark.parametrize("family", ["tiny", "tiny-llama"])
def test_an_untrained_residual_estimator_chooses_exactly_the_heuristic_controls_keys(family):
    torch.manual_seed(0)
    sea = SEAConfig(k=2, t_m=8, query_chunk=9, estimator="residual")
    config = DecoderConfig.preset(family, n_layer=2, block_size=48, attn="sea", sea=sea)
    student = Decoder(config).eval()
    control = Decoder(DecoderConfig.preset(family, n_layer=2, block_size=48, attn="sea-heuristic", sea=sea)).eval()
    control.load_state_dict(student.state_dict(), strict=False)  # the same teacher weights, gates, P
    x = torch.randint(0, 50257, (2, 48))
    with torch.no_grad():
        ours = student.forward_internals(x, need_hidden=False)
        theirs = control.forward_internals(x, need_hidden=False)
    for layer_ours, layer_theirs in zip(ours[2], theirs[2]):
        assert torch.equal(layer_ours["kept_bins"], layer_theirs["kept_bins"])
    torch.testing.assert_close(ours[0], theirs[0])


def old_warm_up_loss(mechanisms, teacher, x):
    """The warm-up's loss as it was computed before estimator_step: every layer's T x T map kept from one
    forward pass with the eager attention, one graph over all layers."""
    with torch.no_grad():
        _, _, layers = teacher.forward_internals(x, need_hidden=False, logits=None)
    rows = torch.arange(x.size(1))
    losses = [estimate_loss(m.estimate(layer["q"], layer["k"], layer["v"]), bin_targets(layer["probs"], rows, m.cfg.t_m))
              for m, layer in zip(mechanisms, layers)]
    return sum(losses) / len(losses)


def test_the_teachers_bin_targets_piece_by_piece_equal_those_of_the_whole_map():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 50, 8, dtype=torch.float64), torch.randn(2, 3, 50, 8, dtype=torch.float64)
    rows = torch.arange(50)
    whole = bin_targets(exact_attention(q, k, rows), rows, 8)
    for ours, theirs in zip(attention_bin_targets(causal_attention_pieces(q, k, rows_per_piece=7), 8), whole):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("estimator", ["paper", "residual"])
def test_the_layer_by_layer_warm_up_step_equals_the_whole_graph(estimator):
    torch.manual_seed(0)
    teacher = Decoder(DecoderConfig.preset("tiny-llama", n_layer=2, block_size=40)).double().eval()
    for block in teacher.layers:  # both paths' teacher eager, so its layers see the same inputs (SDPA rounds otherwise)
        block.self_attn.mechanism.eager = True
    student = Decoder(DecoderConfig.preset("tiny-llama", n_layer=2, block_size=40, attn="sea",
                                           sea=SEAConfig(k=2, t_m=8, estimator=estimator))).double()
    student.load_state_dict(teacher.state_dict(), strict=False)
    if estimator == "residual":  # a trained-looking residual, so every part of the decoder has a gradient
        for block in student.layers:
            torch.nn.init.normal_(block.self_attn.mechanism.decoder.norm_out.weight)
    mechanisms = [block.self_attn.mechanism for block in student.layers]
    params = [p for name, p in student.named_parameters() if train.is_estimator_parameter(name)]
    x = torch.randint(0, 50257, (2, 40))
    loss = train.estimator_step(mechanisms, teacher, x)
    fast = [p.grad.clone() for p in params]
    student.zero_grad()
    old = old_warm_up_loss(mechanisms, teacher, x)
    old.backward()
    assert loss == pytest.approx(old.item(), rel=1e-12)
    for new_grad, p in zip(fast, params):
        torch.testing.assert_close(new_grad, p.grad)


def test_a_control_with_open_gates_skips_steps_1_2_and_8_with_the_same_numbers(monkeypatch):
    torch.manual_seed(0)
    H, T, D = 2, 40, 8
    control = SinkWindowAttention(H, D, T, SEAConfig(k=2, t_m=8, query_chunk=7)).double().eval()
    assert control.needs_gates()  # fresh gates, sigmoid(3): they change the output
    control.open_gates()
    assert not control.needs_gates()
    assert SEAAttention(H, D, T, SEAConfig(k=2, t_m=8)).open_gates().needs_gates()  # SEA's estimate reads e
    encoded = []
    control.encoder.register_forward_hook(lambda *args: encoded.append(True))
    q, k, v = (torch.randn(1, H, T, D, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        lean = control(q, k, v)[0]
        assert not encoded
        monkeypatch.setattr(SinkWindowAttention, "needs_gates", lambda self: True)
        gated = control(q, k, v)[0]
    assert encoded and torch.equal(lean, gated)
