"""Decoding with a cache equals re-running the full forward pass, for every attention kind."""
from dataclasses import replace

import pytest
import torch

from model import ANALYSIS_KINDS, ATTENTION_KINDS, Decoder, LayerCache, DecoderConfig, build_attention
from reformer import ReformerConfig
from controls import HeuristicBinAttention
from sea import GatedSparseAttention, KeyBlocks, SEAAttention, SEAConfig, heuristic_bin_scores, heuristic_row_scores

KINDS = ATTENTION_KINDS
FAMILIES = {"tiny": {}, "tiny-llama": dict(n_kv_head=1)}  # OPT, and Llama with two query heads per key/value head


def tiny_model(attn, family="tiny", block_size=48):
    # SEA: k = 2, T_M = 8, so rows up to 4 tokens long are dense and later ones sparse; prompts
    # run in chunks of 3 rows at inference
    torch.manual_seed(0)
    sea = SEAConfig(k=2, t_m=8, query_chunk=3)
    config = DecoderConfig.preset(family, n_layer=2, n_embd=64, n_head=2, block_size=block_size, attn=attn, sea=sea,
                                  reformer=ReformerConfig(bucket_size=4, n_hashes=2), **FAMILIES[family])
    return Decoder(config).double().eval()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", KINDS)
def test_cached_logits_equal_the_full_pass_at_every_step(attn, family):
    model = tiny_model(attn, family)
    idx = torch.randint(0, 50257, (2, 30))
    with torch.no_grad():
        full = model(idx)[0]
        caches = [LayerCache() for _ in model.layers]
        prompt = model.forward_internals(idx[:, :7], need_hidden=False, need_layers=False, caches=caches)[0]
        torch.testing.assert_close(prompt, full[:, :7])
        assert caches[0].keys.rows().shape[1] == model.config.kv_heads  # one cached key per key/value head
        for i in range(7, 30):  # then one token at a time, through the dense rows into the sparse ones
            step = model.forward_internals(idx[:, i:i + 1], need_hidden=False, need_layers=False, caches=caches)[0]
            torch.testing.assert_close(step[:, 0], full[:, i], msg=f"position {i}")


@pytest.mark.parametrize("attn", KINDS)
def test_greedy_generation_equals_rerunning_the_full_pass(attn):
    model = tiny_model(attn)
    prompt = torch.randint(0, 50257, (1, 6))
    generated = model.generate(prompt, 20, top_k=1)
    expected = prompt
    with torch.no_grad():
        for _ in range(20):
            expected = torch.cat([expected, model(expected)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, expected)


def test_each_decoding_step_yields_its_token_and_the_logits_of_the_full_pass():
    model = tiny_model("sea")
    sequence = torch.randint(0, 50257, (1, 6))
    for tokens, logits in model.decode_steps(sequence, 5, top_k=1):
        with torch.no_grad():
            expected = model(sequence)[0][:, -1]
        assert torch.allclose(logits, expected, atol=1e-5) and torch.equal(tokens, logits.argmax(-1, keepdim=True))
        sequence = torch.cat([sequence, tokens], dim=1)
    assert sequence.size(1) == 11


@pytest.mark.parametrize("estimator", ["paper", "residual"])
def test_sea_decoding_keeps_the_bins_of_the_full_pass(estimator):
    torch.manual_seed(0)
    attention = SEAAttention(3, 16, 64, SEAConfig(k=2, t_m=8, estimator=estimator)).double().eval()
    q, k, v = (torch.randn(2, 3, 40, 16, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        _, full_aux, _ = attention.attend_chunk(q, k, v, 0, None, materialize=True)
        _, prompt_aux, state = attention.attend_chunk(q[:, :, :10], k[:, :, :10], v[:, :, :10], 0, None, True)
        kept = [prompt_aux["kept_bins"]]
        for i in range(10, 40):
            _, aux, state = attention.attend_chunk(q[:, :, i:i + 1], k[:, :, :i + 1], v[:, :, :i + 1], i, state, True)
            kept.append(aux["kept_bins"])
    # row i's budget is that of position i, not of a one-row sequence
    assert torch.equal(torch.cat(kept, dim=2), full_aux["kept_bins"])


def test_sampling_is_repeatable_and_checked():
    model = tiny_model("sea")
    prompt = torch.randint(0, 50257, (2, 4))
    sample = lambda seed: model.generate(prompt, 8, temperature=0.8, top_k=50,
                                         generator=torch.Generator().manual_seed(seed))
    assert torch.equal(sample(1), sample(1)) and not torch.equal(sample(1), sample(2))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 4, temperature=0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 4, top_k=0)


def test_generation_stops_at_the_block_size():
    model = tiny_model("dense", block_size=16)
    assert model.generate(torch.randint(0, 50257, (1, 10)), 100).shape == (1, 16)


def test_sample_command_prints_the_continuation(tmp_path, capsys):
    import eval as evaluate
    model = tiny_model("sea", block_size=32).float()
    torch.save(dict(model=model.state_dict(), config=model.config.to_dict()), tmp_path / "sea.pt")
    text = evaluate.main(["--ckpt", str(tmp_path / "sea.pt"), "--sample", "The cat sat", "--max-new-tokens", "50",
                          "--top-k", "5", "--seed", "3"])
    out = capsys.readouterr().out
    assert out.startswith("The cat sat" + text)
    assert "tokens/s" in out and "stopped at the model's block_size" in out  # 3 prompt tokens + 29 new
    with pytest.raises(SystemExit, match="prompt has 0 tokens"):
        evaluate.main(["--ckpt", str(tmp_path / "sea.pt"), "--sample", ""])


@pytest.mark.parametrize("sparse_step_7", [False, True])
@pytest.mark.parametrize("attn", [*KINDS, "eager", *ANALYSIS_KINDS])
def test_grouped_query_attention_equals_the_repeated_heads_computation(attn, sparse_step_7):
    """Every mechanism takes keys and values with their own head count (4 query heads, 2 key/value heads):
    the numbers of the whole pass and of decoding equal those of the keys and values repeated per query head.
    sparse_step_7: the gathered step 7 even on these short rows (else a masked dense softmax)."""
    config = tiny_model("dense" if attn == "eager" else attn, "tiny-llama", block_size=40).config
    mechanism = build_attention(replace(config, n_head=4, n_kv_head=2)).double().eval()
    if attn == "eager":
        mechanism.eager = True
    if sparse_step_7:
        if not isinstance(mechanism, GatedSparseAttention):
            pytest.skip("only the gated sparse kinds have two forms of step 7")
        mechanism.FEW_KEYS = 0
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 40, 16, dtype=torch.float64), *torch.randn(2, 2, 2, 40, 16, dtype=torch.float64)
    repeated = lambda x: x.repeat_interleave(2, dim=1)  # (B, 4, T, D): what the model computed before
    with torch.no_grad():
        torch.testing.assert_close(mechanism(q, k, v)[0], mechanism(q, repeated(k), repeated(v))[0])
        state, repeated_state = None, None
        for start, end in ((0, 9), *((i, i + 1) for i in range(9, 40))):  # a prompt, then a token at a time
            rows, seen = slice(start, end), slice(0, end)
            out, state = mechanism.extend(q[:, :, rows], k[:, :, seen], v[:, :, seen], start, state)
            expected, repeated_state = mechanism.extend(q[:, :, rows], repeated(k[:, :, seen]),
                                                        repeated(v[:, :, seen]), start, repeated_state)
            torch.testing.assert_close(out, expected, msg=f"rows {start}..{end - 1}")


@pytest.mark.parametrize("family", FAMILIES)
def test_last_position_logits_equal_the_full_pass(family):
    model = tiny_model("sea", family)
    idx = torch.randint(0, 50257, (2, 30))
    with torch.no_grad():
        full = model(idx)[0]
        last = model.forward_internals(idx, need_hidden=False, need_layers=False, logits="last")[0]
        assert model.forward_internals(idx, need_hidden=False, need_layers=False, logits=None)[0] is None
    assert last.shape == (2, 1, full.size(-1))
    torch.testing.assert_close(last, full[:, -1:])
    with pytest.raises(ValueError, match="logits="):
        model.forward_internals(idx, logits="first")


def test_a_cache_of_known_capacity_is_allocated_once():
    cache = LayerCache(capacity=10)
    k = torch.randn(1, 2, 11, 4)
    keys, _ = cache.append(k[:, :, :7], k[:, :, :7])
    buffer = cache.keys.buffer
    keys, _ = cache.append(k[:, :, 7:10], k[:, :, 7:10])
    assert cache.keys.buffer is buffer and buffer.size(2) == 10  # filled to capacity, never copied
    keys, _ = cache.append(k[:, :, 10:], k[:, :, 10:])  # past it: the buffer doubles
    assert cache.keys.buffer.size(2) == 22 and torch.equal(keys, k)


def open_heuristic(n_head=4, kv_heads=2, head_dim=16, T=90, finalists=1, batch=1, overlap=False):
    """sea-heuristic with open gates (the training-free use), T_M 8 and 2 key blocks a bin: blocks of one key up
    to row 31, of 2 from row 31, of 5 by row 89; two query heads per key/value head."""
    torch.manual_seed(0)
    config = SEAConfig(k=2, t_m=8, sub_bins=2, finalists=finalists, overlap=overlap)
    attention = HeuristicBinAttention(n_head, head_dim, T, config).double().eval()
    q = torch.randn(batch, n_head, T, head_dim, dtype=torch.float64)
    k, v = (torch.randn(batch, kv_heads, T, head_dim, dtype=torch.float64) for _ in range(2))
    return attention.open_gates(), q, k, v


@pytest.mark.parametrize("finalists, batch, overlap", [(1, 1, False), (2, 1, False), (2, 3, False), (2, 1, True)])
def test_a_heuristic_decoding_step_of_one_row_equals_the_full_pass(monkeypatch, finalists, batch, overlap):
    attention, q, k, v = open_heuristic(finalists=finalists, batch=batch, overlap=overlap)
    steps = []
    original = HeuristicBinAttention.decode_row
    monkeypatch.setattr(HeuristicBinAttention, "decode_row", lambda *args: steps.append(1) or original(*args))
    with torch.no_grad():
        full, _ = attention(q, k, v)
        out, state = attention.extend(q[:, :, :5], k[:, :, :5], v[:, :, :5], 0, None)
        outs = [out]
        for i in range(5, q.size(2)):
            out, state = attention.extend(q[:, :, i:i + 1], k[:, :, :i + 1], v[:, :, :i + 1], i, state)
            outs.append(out)
    assert len(steps) == q.size(2) - 5  # every one-row step took the short path
    torch.testing.assert_close(torch.cat(outs, dim=2), full)


@pytest.mark.parametrize("overlap", [False, True])
def test_the_heuristics_one_row_scores_equal_its_scores_of_every_row(overlap):
    _, q, k, _ = open_heuristic()
    rows = torch.arange(q.size(2))
    every_row = heuristic_bin_scores(q, k, KeyBlocks(), rows, 8, 2, overlap)
    blocks = KeyBlocks()  # grown a row at a time, as decoding grows it
    for row in range(q.size(2)):
        one = heuristic_row_scores(q[:, :, row:row + 1], k[:, :, :row + 1], blocks, row, 8, 2, overlap)
        torch.testing.assert_close(one, every_row[:, :, row:row + 1], msg=f"row {row}")
