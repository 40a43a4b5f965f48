"""Decoding with a cache equals re-running the full forward pass, for every attention kind."""
import pytest
import torch

from model import ATTENTION_KINDS, Decoder, LayerCache, DecoderConfig
from reformer import ReformerConfig
from sea import SEAAttention, SEAConfig

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
