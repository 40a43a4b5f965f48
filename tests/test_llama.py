"""The Llama family: GGUF and Hugging Face loading against independent forward passes, its tokenizer,
the loaders' one-line errors. (Every attention kind on a grouped-query llama: test_generate.py and
test_sea.py.)"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

gguf = pytest.importorskip("gguf")

import bench  # noqa: E402
import data  # noqa: E402
from data import bytes_to_unicode, get_tokenizer  # noqa: E402
from model import Decoder, DecoderConfig  # noqa: E402
from weights import read_gguf_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_dim=96, context=32, rope_base=10000.0, eps=1e-5)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["t h", "th e", "Ġ c", "Ġc a", "Ġca t", "Ġ th", "Ġth e", "a t", "Ġ s", "Ġs at"]


def tiny_vocabulary():
    """Control tokens, the 256 bytes (in GPT-2's alphabet), then one token per merge, in merge order."""
    byte_tokens = list(bytes_to_unicode().values())
    return SPECIALS + byte_tokens + ["".join(rule.split(" ")) for rule in MERGES]


def write_gguf(path, arch="llama", quantized=True, seed=0, merges=MERGES, matrix_type=None):
    """A random llama model in GGUF, as llama.cpp lays it out (q/k rows in adjacent rotary pairs)."""
    rng = np.random.default_rng(seed)
    s, tokens = SHAPE, tiny_vocabulary()
    C, F_, kv = s["n_embd"], s["ffn_dim"], s["n_kv_head"] * s["n_embd"] // s["n_head"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(s["n_layer"])
    writer.add_context_length(s["context"])
    writer.add_embedding_length(C)
    writer.add_feed_forward_length(F_)
    writer.add_head_count(s["n_head"])
    writer.add_head_count_kv(s["n_kv_head"])
    writer.add_rope_freq_base(s["rope_base"])
    writer.add_layer_norm_rms_eps(s["eps"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(merges)
    matrix_type = matrix_type or (gguf.GGMLQuantizationType.Q4_1 if quantized else gguf.GGMLQuantizationType.F32)

    def add(name, shape, kind=None, scale=0.2, offset=0.0):
        values = (offset + scale * rng.standard_normal(shape)).astype(np.float32)
        kind = kind or (matrix_type if len(shape) == 2 else gguf.GGMLQuantizationType.F32)
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, values)
        elif kind == gguf.GGMLQuantizationType.Q8_1:  # a type the gguf package has no dequantizer for
            block, size = gguf.GGML_QUANT_SIZES[kind]
            writer.add_tensor(name, np.zeros((shape[0], shape[1] // block * size), np.uint8), raw_dtype=kind)
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)  # bytes per row

    embedding_type = gguf.GGMLQuantizationType.Q8_0 if quantized else None
    add("token_embd.weight", (len(tokens), C), kind=embedding_type, scale=0.5)
    for i in range(s["n_layer"]):
        add(f"blk.{i}.attn_norm.weight", (C,), scale=0.1, offset=1.0)
        for name, rows in (("attn_q", C), ("attn_k", kv), ("attn_v", kv), ("attn_output", C)):
            add(f"blk.{i}.{name}.weight", (rows, C))
        add(f"blk.{i}.ffn_norm.weight", (C,), scale=0.1, offset=1.0)
        add(f"blk.{i}.ffn_gate.weight", (F_, C))
        add(f"blk.{i}.ffn_up.weight", (F_, C))
        add(f"blk.{i}.ffn_down.weight", (C, F_))
    add("output_norm.weight", (C,), scale=0.1, offset=1.0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def reference_gguf_logits(path, ids):
    """A plain llama forward pass over the GGUF's dequantized arrays, rotary pairs where the file has
    them (dims 2i, 2i + 1), written without any of the project's code."""
    reader = gguf.GGUFReader(str(path))
    w = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(
        tuple(int(n) for n in reversed(t.shape))).astype(np.float32)) for t in reader.tensors}
    s = SHAPE
    H, Hkv, C = s["n_head"], s["n_kv_head"], s["n_embd"]
    D, T = C // H, len(ids)
    rms = lambda x, g: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + s["eps"]) * g
    angle = torch.arange(T)[:, None].double() * s["rope_base"] ** (-torch.arange(0, D, 2).double() / D)
    cos, sin = angle.cos().float(), angle.sin().float()  # (T, D/2)

    def rope(x):  # (heads, T, D), pairs (2i, 2i + 1)
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)

    x = w["token_embd.weight"][torch.tensor(ids)]
    for i in range(s["n_layer"]):
        g = lambda name: w[f"blk.{i}.{name}.weight"]
        h = rms(x, g("attn_norm"))
        q = rope((h @ g("attn_q").T).view(T, H, D).transpose(0, 1))
        k = rope((h @ g("attn_k").T).view(T, Hkv, D).transpose(0, 1))
        v = (h @ g("attn_v").T).view(T, Hkv, D).transpose(0, 1)
        k, v = k.repeat_interleave(H // Hkv, 0), v.repeat_interleave(H // Hkv, 0)
        scores = (q @ k.transpose(-1, -2)) / D ** 0.5
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        x = x + (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, C) @ g("attn_output").T
        h = rms(x, g("ffn_norm"))
        x = x + (F.silu(h @ g("ffn_gate").T) * (h @ g("ffn_up").T)) @ g("ffn_down").T
    return rms(x, w["output_norm.weight"]) @ w["token_embd.weight"].T


@pytest.fixture
def gguf_path(tmp_path):
    return write_gguf(tmp_path / "tiny.gguf")


@pytest.mark.parametrize("quantized", [True, False], ids=["q4_1+q8_0", "f32"])
def test_gguf_logits_equal_an_independent_forward_pass(tmp_path, quantized):
    path = write_gguf(tmp_path / "tiny.gguf", quantized=quantized)
    model = Decoder.from_pretrained(path).eval()
    c = model.config
    assert (c.n_layer, c.n_head, c.n_kv_head, c.norm, c.positions, c.mlp, c.bias, c.tied_output) == \
        (2, 4, 2, "rmsnorm", "rotary", "swiglu", False, True)
    ids = list(range(3, 3 + 20))
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0]
    torch.testing.assert_close(ours, reference_gguf_logits(path, ids), rtol=1e-4, atol=1e-4)


def test_the_rotary_layout_matters(gguf_path):
    """Loaded without undoing llama.cpp's reordering of q/k rows, the model is a different one."""
    fields, state = read_gguf_model(gguf_path, adjacent_rotary_pairs=True)
    model = Decoder(DecoderConfig(**fields))
    model.load_checked_state_dict(state, "test")
    ids = list(range(3, 3 + 20))
    with torch.no_grad():
        ours = model.eval()(torch.tensor([ids]))[0][0]
    assert not torch.allclose(ours, reference_gguf_logits(gguf_path, ids), rtol=1e-2, atol=1e-2)


def test_gguf_tokenizer_round_trips_and_splits_digits(gguf_path):
    enc = get_tokenizer(str(gguf_path))
    text = "the cat sat on 2024 mats, 7 times!\n\n  the end"
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    vocabulary = tiny_vocabulary()
    assert [vocabulary[i] for i in enc.encode_ordinary(" the cat")] == ["Ġthe", "Ġcat"]
    digits = enc.encode_ordinary("2024")
    assert [enc.decode([i]) for i in digits] == ["2", "0", "2", "4"]
    assert enc.encode("<|im_start|>", allowed_special="all") == [1]  # control tokens are special tokens


def test_merges_out_of_id_order_are_refused(tmp_path):
    """tiktoken ranks by id: a vocabulary whose merge results are not numbered in merge order would
    tokenize differently, so it is refused."""
    swapped = [MERGES[1], MERGES[0]] + MERGES[2:]  # "th e" before "t h": the ids no longer follow the rules
    path = write_gguf(tmp_path / "bad.gguf", merges=swapped)
    with pytest.raises(ValueError, match="merge order"):
        get_tokenizer(str(path))


SMOLLM2 = data.default_cache_dir() / "pretrained" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(not SMOLLM2.is_file(), reason=f"the real SmolLM2 GGUF is not in the cache ({SMOLLM2}); "
                                                  f"python eval.py --init-from smollm2-135m fetches it")
def test_the_real_smollm2_vocabulary():
    enc = get_tokenizer(str(SMOLLM2))
    assert enc.n_vocab == 49152
    assert enc.encode_ordinary("Hello world") == [19556, 905]
    assert enc.encode_ordinary("The year 2024 was 12.5% better") == [
        504, 713, 216, 34, 32, 34, 36, 436, 216, 33, 34, 30, 37, 21, 1365]
    assert enc.encode("<|im_start|>user<|im_end|>", allowed_special="all")[::2] == [1, 2]


def write_hf_llama(folder, gguf_path, weights="pytorch_model.bin"):
    """The same random model as a Hugging Face llama directory: config.json, tokenizer.json and the
    weights under HF's names, in HF's rotary layout (halves), from the GGUF's dequantized arrays."""
    fields, state = read_gguf_model(gguf_path)
    folder.mkdir()
    names = {"embed_tokens.weight": "model.embed_tokens.weight", "final_layer_norm.weight": "model.norm.weight"}
    hf_state = {}
    for key, tensor in state.items():
        hf_key = names.get(key) or "model." + key.replace("self_attn_layer_norm", "input_layernorm").replace(
            "final_layer_norm", "post_attention_layernorm").replace("out_proj", "o_proj").replace(
            "fc_gate", "mlp.gate_proj").replace("fc1", "mlp.up_proj").replace("fc2", "mlp.down_proj")
        hf_state[hf_key] = tensor.contiguous()
    if weights == "model.safetensors":
        from safetensors.torch import save_file
        save_file(hf_state, folder / weights)
    else:
        torch.save(hf_state, folder / weights)
    s = SHAPE
    (folder / "config.json").write_text(json.dumps(dict(
        model_type="llama", num_hidden_layers=s["n_layer"], hidden_size=s["n_embd"], num_attention_heads=s["n_head"],
        num_key_value_heads=s["n_kv_head"], intermediate_size=s["ffn_dim"], max_position_embeddings=s["context"],
        rms_norm_eps=s["eps"], rope_theta=s["rope_base"], vocab_size=len(tiny_vocabulary()), tie_word_embeddings=True,
        hidden_act="silu")))
    vocabulary = tiny_vocabulary()
    (folder / "tokenizer.json").write_text(json.dumps(dict(
        added_tokens=[dict(id=i, content=t, special=True) for i, t in enumerate(SPECIALS)],
        pre_tokenizer=dict(type="Sequence", pretokenizers=[dict(type="Digits", individual_digits=True),
                                                          dict(type="ByteLevel", add_prefix_space=False)]),
        model=dict(type="BPE", vocab={t: i for i, t in enumerate(vocabulary) if i >= len(SPECIALS)},
                   merges=MERGES))))
    return folder


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.safetensors"])
def test_hugging_face_llama_directory_equals_the_gguf(tmp_path, gguf_path, weights):
    if weights == "model.safetensors":
        pytest.importorskip("safetensors")
    folder = write_hf_llama(tmp_path / "hf", gguf_path, weights)
    model = Decoder.from_pretrained(folder).eval()
    ids = list(range(3, 3 + 20))
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0]
    torch.testing.assert_close(ours, reference_gguf_logits(gguf_path, ids), rtol=1e-4, atol=1e-4)
    text = "the cat sat 12 times"
    assert get_tokenizer(model.config.tokenizer).encode_ordinary(text) == \
        get_tokenizer(str(gguf_path)).encode_ordinary(text)


def bad_ggufs(tmp_path, gguf_path):
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf_path.read_bytes()[:-5000])
    cut_header = tmp_path / "header.gguf"
    cut_header.write_bytes(gguf_path.read_bytes()[:100])
    return [(not_gguf, "not a GGUF file"), (truncated, "truncated"), (cut_header, "truncated"),
            (write_gguf(tmp_path / "gpt2.gguf", arch="gpt2"), "architecture 'gpt2' is not supported"),
            (write_gguf(tmp_path / "q8_1.gguf", matrix_type=gguf.GGMLQuantizationType.Q8_1), "Q8_1, which the gguf")]


def test_bad_gguf_files_give_one_line_naming_the_file_and_the_problem(tmp_path, gguf_path):
    for path, problem in bad_ggufs(tmp_path, gguf_path):
        result = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--init-from", str(path)],
                                capture_output=True, text=True, cwd=ROOT)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1, (path.name, result.stderr)
        assert lines[0].startswith("error: ") and path.name in lines[0] and problem in lines[0], lines[0]


def test_eval_on_a_gguf_writes_its_json(tmp_path, gguf_path, monkeypatch):
    import eval as evaluate
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "wiki.test.raw").write_text("the cat sat on the mat 12 times\n" * 12)
    monkeypatch.setenv("SEA_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "row.json"
    evaluate.main(["--init-from", str(gguf_path), "--data-dir", str(folder), "--block-size", "16",
                   "--max-windows", "3", "--json", str(out)])
    row = json.loads(out.read_text())
    tokens = get_tokenizer(str(gguf_path)).encode_ordinary((folder / "wiki.test.raw").read_text())
    assert row["tokens"] == len(tokens) and row["windows"] == 3 and row["block_size"] == 16
    assert row["ppl"] > 1


def test_token_caches_of_two_tokenizers_never_mix(tmp_path, gguf_path, monkeypatch):
    monkeypatch.setenv("SEA_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "wiki.test.raw").write_bytes(b" = Title = \r\n the cat sat 12 times \r\n")  # Windows line ends
    ours = data.load_tokens("test", folder, tokenizer=str(gguf_path))
    gpt2 = data.load_tokens("test", folder)
    assert len(list((tmp_path / "cache" / "tokens").glob("wiki.test.raw.*.bin"))) == 2
    text = " = Title = \n the cat sat 12 times \n"  # read as text: line ends normalised
    assert get_tokenizer(str(gguf_path)).decode(ours.tolist()) == text
    assert get_tokenizer().decode(gpt2.tolist()) == text
    assert not np.array_equal(ours[:len(gpt2)], gpt2[:len(ours)])


def test_the_demo_runs_on_a_tiny_gguf_and_eval_reads_back_what_it_saves(tmp_path, gguf_path, wikitext,
                                                                         monkeypatch, capsys):
    import eval as evaluate
    import train
    monkeypatch.setenv("SEA_DATA_DIR", str(wikitext))
    monkeypatch.delenv(train.TEST_DATA_ENV, raising=False)  # the test split from the same folder
    out = tmp_path / "demo"
    rows = train.demo(str(gguf_path), block_size=32, k=4, t_m=8, distill_steps=2, warm_up_steps=2, windows=2,
                      out_dir=str(out))
    distilled = ["sea, distilled 2", "sink-window, distilled 2"]
    assert list(rows) == ["dense teacher", *train.DEMO_SWAPS, "sea, paper's", *distilled]
    assert [rows[name]["training"] for name in ("window", "sea, paper's", *distilled)] == [
        "none", "warm-up 2 windows", "distilled 2 steps", "distilled 2 steps"]
    assert all(row["windows"] == 2 and row["ppl"] > 1 for row in rows.values())
    assert all(0 <= row["recall_late"] <= row["oracle_late"] + 1e-5 for name, row in rows.items()
               if name != "dense teacher")
    assert json.loads((out / "table.json").read_text()).keys() == rows.keys()
    for picture in ("attention.png", "recall-per-layer.png", "distillation.png"):
        assert (out / picture).stat().st_size > 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in rows)
    commands = [line.split("python train.py ")[1].rsplit("  [", 1)[0].split() for line in printed.splitlines()
                if "python train.py " in line]  # each run's command, as printed, runs as it says
    assert len(commands) == 3 and all(train.parse_args(words).recall is False for words in commands)
    sea_ratio = rows["sea, distilled 2"]["ratio"]
    sentence = next(line for line in printed.splitlines() if line.startswith("distillation, 2 steps each"))
    assert f"to {sea_ratio:.3f}x" in sentence  # measured, not written in advance
    for method, name in zip(train.DEMO_STUDENTS, distilled):
        history = [json.loads(line) for line in (out / method / "history.jsonl").read_text().splitlines()]
        assert [entry["step"] for entry in history] == [0, 1, 2]  # the curve starts untrained
        ppl = evaluate.main(["--ckpt", str(out / method / "ckpt.pt"), "--block-size", "32", "--max-windows", "2"])
        assert ppl == pytest.approx(rows[name]["ppl"], rel=1e-4)
    saved = out / "sea" / "ckpt.pt"
    capsys.readouterr()
    evaluate.main(["--ckpt", str(saved), "--sample", "the cat", "--max-new-tokens", "3", "--top-k", "1"])
    assert capsys.readouterr().out.startswith("the cat")


def test_the_model_benchmark_runs_pretrained_weights_on_the_test_text(gguf_path, wikitext, capsys):
    records = bench.main(["--bench-model", "--init-from", str(gguf_path), "--data-dir", str(wikitext),
                          "--bench-lengths", "40", "--max-new-tokens", "2", "--device", "cpu"])
    measured = [r for r in records if r["kind"] == "smollm2"]
    assert [r["method"] for r in measured] == list(bench.PRETRAINED_ROWS)
    assert all(r["prefill_seconds"] > 0 and r["seconds_per_token"] > 0 and r["init_from"] == str(gguf_path)
               and 0 < r["attention_calls_per_layer"] < r["calls_per_layer"] for r in measured)
    assert [r["method"] for r in records if r["kind"] == "floor"] == list(bench.PRETRAINED_ROWS)
    assert "sea-heuristic k=64 / dense:  T=40: prefill" in capsys.readouterr().out
