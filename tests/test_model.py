import json

import pytest
import torch
import torch.nn.functional as F

from model import GPT2_VOCAB_SIZE, Decoder, DecoderConfig
from data import bytes_to_unicode
from data import get_tokenizer

HF_VOCAB = 50272  # rows in a real OPT embedding


def hf_config(pre_ln, proj_dim):
    return dict(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, ffn_dim=32,
                max_position_embeddings=24, word_embed_proj_dim=proj_dim, vocab_size=HF_VOCAB,
                do_layer_norm_before=pre_ln, activation_function="relu")


def random_hf_state(cfg, gen):
    """Random weights under the Hugging Face OPTForCausalLM key names."""
    C, P, F_ = cfg["hidden_size"], cfg["word_embed_proj_dim"], cfg["ffn_dim"]
    r = lambda *shape: torch.randn(*shape, generator=gen) * 0.3
    s = {"model.decoder.embed_tokens.weight": r(HF_VOCAB, P),
         "model.decoder.embed_positions.weight": r(cfg["max_position_embeddings"] + 2, C)}
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.decoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[pre + f"self_attn.{name}.weight"], s[pre + f"self_attn.{name}.bias"] = r(C, C), r(C)
        s[pre + "fc1.weight"], s[pre + "fc1.bias"] = r(F_, C), r(F_)
        s[pre + "fc2.weight"], s[pre + "fc2.bias"] = r(C, F_), r(C)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            s[pre + f"{norm}.weight"], s[pre + f"{norm}.bias"] = 1 + r(C), r(C)
    if cfg["do_layer_norm_before"]:
        s["model.decoder.final_layer_norm.weight"] = 1 + r(C)
        s["model.decoder.final_layer_norm.bias"] = r(C)
    if P != C:
        s["model.decoder.project_in.weight"] = r(C, P)
        s["model.decoder.project_out.weight"] = r(P, C)
    s["lm_head.weight"] = s["model.decoder.embed_tokens.weight"]
    return s


def reference_opt_logits(s, cfg, opt_ids):
    """A plain functional OPT forward over the HF state dict, in OPT's own id numbering."""
    g = lambda name: s["model.decoder." + name]
    H, C = cfg["num_attention_heads"], cfg["hidden_size"]
    T = opt_ids.shape[1]
    x = g("embed_tokens.weight")[opt_ids]
    if "model.decoder.project_in.weight" in s:
        x = x @ g("project_in.weight").T
    x = x + g("embed_positions.weight")[torch.arange(T) + 2]
    ln = lambda t, n: F.layer_norm(t, (C,), g(n + ".weight"), g(n + ".bias"))
    lin = lambda t, n: t @ g(n + ".weight").T + g(n + ".bias")
    for i in range(cfg["num_hidden_layers"]):
        L = f"layers.{i}."
        h = ln(x, L + "self_attn_layer_norm") if cfg["do_layer_norm_before"] else x
        heads = lambda t: t.view(1, T, H, C // H).transpose(1, 2)
        q = heads(lin(h, L + "self_attn.q_proj") * (C // H) ** -0.5)
        k, v = heads(lin(h, L + "self_attn.k_proj")), heads(lin(h, L + "self_attn.v_proj"))
        scores = (q @ k.transpose(-1, -2)).masked_fill(torch.ones(T, T).triu(1).bool(), -1e9)
        h = lin((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, T, C), L + "self_attn.out_proj")
        x = x + h if cfg["do_layer_norm_before"] else ln(x + h, L + "self_attn_layer_norm")
        h = ln(x, L + "final_layer_norm") if cfg["do_layer_norm_before"] else x
        h = lin(torch.relu(lin(h, L + "fc1")), L + "fc2")
        x = x + h if cfg["do_layer_norm_before"] else ln(x + h, L + "final_layer_norm")
    if cfg["do_layer_norm_before"]:
        x = ln(x, "final_layer_norm")
    if "model.decoder.project_out.weight" in s:
        x = x @ g("project_out.weight").T
    return x @ s["lm_head.weight"].T


@pytest.mark.parametrize("pre_ln,proj_dim", [(True, 16), (False, 8)], ids=["pre-ln", "post-ln-project-in"])
def test_hf_checkpoint_logits_match_reference(tmp_path, pre_ln, proj_dim):
    gen = torch.Generator().manual_seed(0)
    cfg = hf_config(pre_ln, proj_dim)
    state = random_hf_state(cfg, gen)
    # number the GPT-2 tokens differently from GPT-2, like OPT's vocab.json does
    enc, byte_char = get_tokenizer(), bytes_to_unicode()
    opt_id = (torch.randperm(GPT2_VOCAB_SIZE - 1, generator=gen) + 4).tolist() + [2]
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for t in range(GPT2_VOCAB_SIZE - 1):
        vocab["".join(byte_char[b] for b in enc.decode_single_token_bytes(t))] = opt_id[t]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    torch.save(state, tmp_path / "pytorch_model.bin")

    model = Decoder.from_pretrained(tmp_path).eval()
    assert model.config.pre_ln == pre_ln and model.config.proj_dim == proj_dim
    gpt2_ids = torch.tensor([enc.encode_ordinary("Hello world, this is OPT speaking.") + [50256]])
    ours, _ = model(gpt2_ids)
    reference = reference_opt_logits(state, cfg, torch.tensor(opt_id)[gpt2_ids])
    assert ours.shape == (1, gpt2_ids.shape[1], GPT2_VOCAB_SIZE)
    # our logit for GPT-2 token t is the reference's logit for OPT id of t
    torch.testing.assert_close(ours, reference[..., opt_id], rtol=1e-4, atol=1e-4)


def test_causality_dense():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig.preset("tiny", n_layer=2, block_size=32)).eval()
    x = torch.randint(0, GPT2_VOCAB_SIZE, (2, 32))
    y = x.clone()
    p = 13
    y[:, p + 1:] = torch.randint(0, GPT2_VOCAB_SIZE, (2, 32 - p - 1))
    with torch.no_grad():
        a, b = model(x)[0], model(y)[0]
    torch.testing.assert_close(a[:, :p + 1], b[:, :p + 1])
    assert not torch.allclose(a[:, p + 1:], b[:, p + 1:])


@pytest.mark.parametrize("attn", ["sea", "sink-window"])
def test_a_new_models_gates_start_where_the_mechanism_puts_them(attn):
    """The model's initialisation zeroes its linear layers' biases; SEA's gates start at sigmoid(3) all the same."""
    model = Decoder(DecoderConfig.preset("tiny", n_layer=2, block_size=32, attn=attn))
    for block in model.layers:
        assert torch.equal(block.self_attn.mechanism.gates.bias, torch.full((2,), 3.0))


def test_eager_path_matches_sdpa():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig.preset("tiny", n_layer=2, block_size=32)).eval()
    x = torch.randint(0, GPT2_VOCAB_SIZE, (2, 32))
    with torch.no_grad():
        eager, hidden, layers = model.forward_internals(x)
        fast, _ = model(x)
    torch.testing.assert_close(eager, fast, rtol=1e-4, atol=1e-4)
    assert len(hidden) == 3 and len(layers) == 2
    probs = layers[0]["probs"]
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 32))
    assert probs.triu(1).abs().max() == 0


def test_presets_and_bad_overrides():
    c = DecoderConfig.preset("opt-350m")
    assert (c.n_layer, c.n_embd, c.proj_dim, c.pre_ln) == (24, 1024, 512, False)
    assert DecoderConfig.preset("opt-125m", block_size=512).block_size == 512
    with pytest.raises(ValueError, match="unknown preset"):
        DecoderConfig.preset("opt-7b")
    with pytest.raises(ValueError, match="unknown DecoderConfig field"):
        DecoderConfig.preset("tiny", n_layers=3)
    with pytest.raises(ValueError, match="attn"):
        DecoderConfig.preset("tiny", attn="flash")


def test_mismatched_checkpoint_names_tensor(tmp_path):
    model = Decoder(DecoderConfig.preset("tiny", n_layer=1, block_size=16))
    state = model.state_dict()
    state["layers.0.fc1.weight"] = torch.zeros(7, 128)
    torch.save(dict(model=state, config=model.config.to_dict()), tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match=r"layers\.0\.fc1\.weight.*\(7, 128\).*\(512, 128\)"):
        Decoder.from_checkpoint(tmp_path / "ckpt.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Decoder.from_checkpoint(tmp_path / "missing.pt")


def test_checkpoints_of_the_old_t_m_name_still_load():
    config = DecoderConfig.preset("tiny", attn="sea", sea=dict(k=4, predictor_length=16))
    assert config.sea.t_m == 16 and config.sea.k == 4
