"""
An OPT decoder (the Hugging Face `facebook/opt-*` family) in one file, nanoGPT style.

The module names mirror the Hugging Face checkpoint keys (minus the `model.decoder.`
prefix), so a real OPT state dict loads with a rename and one embedding permutation
(OPT numbers the GPT-2 BPE tokens differently; we speak tiktoken `gpt2` ids).

Attention is pluggable: `OPTConfig.attn` picks the module that turns (q, k, v) into a
context: "dense" (softmax), "sea" (sea.py), "window" (SEA's sliding-window control),
"performer" (FAVOR+ linear attention) or "reformer" (LSH attention, reformer.py).
`build_attention` is the one place that switch happens.
"""

import json
import re
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import default_cache_dir, get_tokenizer
from reformer import LSHAttention, ReformerConfig
from sea import GrowingRows, PerformerAttention, SEAAttention, SEAConfig, WindowAttention

GPT2_VOCAB_SIZE = 50257  # tiktoken "gpt2"; id 50256 is <|endoftext|>
OPT_POSITION_OFFSET = 2  # OPT's learned positions: position p uses row p + 2
ATTENTION_KINDS = ("dense", "sea", "window", "performer", "reformer")


@dataclass
class OPTConfig:
    n_layer: int = 4
    n_embd: int = 128  # hidden size
    n_head: int = 4
    ffn_dim: int = 512
    block_size: int = 256  # maximum sequence length (HF: max_position_embeddings)
    proj_dim: Optional[int] = None  # word embedding width when it differs (350m: 512)
    pre_ln: bool = True  # HF: do_layer_norm_before (False for opt-350m)
    vocab_size: int = GPT2_VOCAB_SIZE
    dropout: float = 0.0
    attn: str = "dense"  # one of ATTENTION_KINDS
    sea: SEAConfig = field(default_factory=SEAConfig)  # knobs for "sea", "window" and "performer"
    reformer: ReformerConfig = field(default_factory=ReformerConfig)  # knobs for "reformer"

    def __post_init__(self):
        if isinstance(self.sea, dict):  # coming back from a checkpoint
            self.sea = SEAConfig(**self.sea)
        if isinstance(self.reformer, dict):
            self.reformer = ReformerConfig(**self.reformer)
        if self.proj_dim is None:
            self.proj_dim = self.n_embd
        if self.attn not in ATTENTION_KINDS:
            raise ValueError(f"attn={self.attn!r}: choose one of {ATTENTION_KINDS}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @staticmethod
    def preset(name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
        unknown = set(overrides) - set(OPTConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown OPTConfig field(s) {sorted(unknown)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self):
        return asdict(self)


PRESETS = {
    # small enough to train on a 2-core CPU in minutes
    "tiny": OPTConfig(n_layer=4, n_embd=128, n_head=4, ffn_dim=512, block_size=256),
    # the Hugging Face facebook/opt-* hyper-parameters
    "opt-125m": OPTConfig(n_layer=12, n_embd=768, n_head=12, ffn_dim=3072, block_size=2048),
    "opt-350m": OPTConfig(n_layer=24, n_embd=1024, n_head=16, ffn_dim=4096, block_size=2048,
                          proj_dim=512, pre_ln=False),
    "opt-1.3b": OPTConfig(n_layer=24, n_embd=2048, n_head=32, ffn_dim=8192, block_size=2048),
    "opt-2.7b": OPTConfig(n_layer=32, n_embd=2560, n_head=32, ffn_dim=10240, block_size=2048),
}


# -----------------------------------------------------------------------------
# attention mechanisms: (q, k, v) of shape (B, H, T, D), q already scaled -> (out, aux)

def causal_attention_probs(q, k):
    """softmax(q k^T) over keys j <= i, in float32: (B, H, T, D) x 2 -> (B, H, T, T)."""
    T = q.size(-2)
    scores = (q @ k.transpose(-2, -1)).float()
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


class DenseAttention(nn.Module):
    """Causal softmax attention. SDPA for speed; eager (the T x T probabilities materialized,
    as Hugging Face's OPT does) when they are wanted, or always with eager=True."""

    def __init__(self, eager=False):
        super().__init__()
        self.eager = eager

    def forward(self, q, k, v, need_weights=False):
        if not (need_weights or self.eager):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
            return out, {}
        probs = causal_attention_probs(q, k)
        return (probs.to(v.dtype) @ v), {"probs": probs}

    def extend(self, q, k, v, start, state):
        """Decoding: the rows start .. start + R - 1 (q (B, H, R, D)) over the keys and values of
        every position so far (B, H, start + R, D). Nothing to keep but those: state stays None."""
        T = k.size(2)
        visible = torch.arange(T, device=q.device) <= torch.arange(start, T, device=q.device)[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=1.0), None


class LayerCache:
    """One layer's decoding cache: the keys and values of every position so far, in buffers that
    double when full (GrowingRows), and the attention mechanism's own state (SEA's prefix sums
    and CNN rows, the Performer's sums; see each mechanism's `extend`)."""

    def __init__(self):
        self.keys, self.values = GrowingRows(), GrowingRows()
        self.state = None

    @property
    def length(self):  # positions cached so far
        return self.keys.length

    def append(self, k, v):
        """Add the new positions' k, v (B, H, n, D); returns views of all of them so far."""
        return self.keys.append(k), self.values.append(v)


def build_attention(config):
    """The one place where `config.attn` picks the attention mechanism."""
    if config.attn == "dense":
        return DenseAttention()
    if config.attn in ("sea", "window"):
        kind = SEAAttention if config.attn == "sea" else WindowAttention
        return kind(config.n_head, config.head_dim, config.block_size, config.sea)
    if config.attn == "reformer":
        return LSHAttention(config.head_dim, config.block_size, config.reformer)
    return PerformerAttention(config.head_dim, config.sea.nbf)


class OPTAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.scaling = config.head_dim ** -0.5
        self.q_proj = nn.Linear(config.n_embd, config.n_embd)
        self.k_proj = nn.Linear(config.n_embd, config.n_embd)
        self.v_proj = nn.Linear(config.n_embd, config.n_embd)
        self.out_proj = nn.Linear(config.n_embd, config.n_embd)
        self.mechanism = build_attention(config)

    def forward(self, x, need_internals=False, cache=None):
        """x (B, T, C) -> (y, internals). With a LayerCache, x holds the positions after the
        cached ones, attended together with those."""
        B, T, C = x.shape
        split_heads = lambda t: t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        q = split_heads(self.q_proj(x) * self.scaling)  # OPT scales q inside the projection
        k = split_heads(self.k_proj(x))
        v = split_heads(self.v_proj(x))
        if cache is None:
            context, aux = self.mechanism(q, k, v, need_weights=need_internals)
        else:
            start = cache.length
            k, v = cache.append(k, v)
            context, cache.state = self.mechanism.extend(q, k, v, start, cache.state)
            aux = {}
        y = self.out_proj(context.transpose(1, 2).reshape(B, T, C))
        internals = dict(aux, q=q, k=k, v=v, context=context) if need_internals else None
        return y, internals


class OPTBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.pre_ln = config.pre_ln
        self.self_attn = OPTAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(config.n_embd)
        self.fc1 = nn.Linear(config.n_embd, config.ffn_dim)
        self.fc2 = nn.Linear(config.ffn_dim, config.n_embd)
        self.final_layer_norm = nn.LayerNorm(config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, need_internals=False, cache=None):
        h = self.self_attn_layer_norm(x) if self.pre_ln else x
        h, internals = self.self_attn(h, need_internals, cache)
        x = x + self.dropout(h)
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_ln else x
        x = x + self.dropout(self.fc2(F.relu(self.fc1(h))))
        if not self.pre_ln:
            x = self.final_layer_norm(x)
        return x, internals


def sample_next_token(logits, temperature=1.0, top_k=None, generator=None):
    """logits (B, V) of the last position -> (B, 1) token ids: softmax(logits / temperature),
    cut to the top_k most likely tokens when top_k is given."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


class OPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.proj_dim)
        self.embed_positions = nn.Embedding(c.block_size + OPT_POSITION_OFFSET, c.n_embd)
        needs_projection = c.proj_dim != c.n_embd
        self.project_in = nn.Linear(c.proj_dim, c.n_embd, bias=False) if needs_projection else None
        self.project_out = nn.Linear(c.n_embd, c.proj_dim, bias=False) if needs_projection else None
        self.layers = nn.ModuleList(OPTBlock(c) for _ in range(c.n_layer))
        self.final_layer_norm = nn.LayerNorm(c.n_embd) if c.pre_ln else None
        self.dropout = nn.Dropout(c.dropout)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None):
        """idx (B, T) tiktoken gpt2 ids -> logits (B, T, vocab), mean cross-entropy or None."""
        logits, _, _ = self.forward_internals(idx, need_hidden=False, need_layers=False)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def forward_internals(self, idx, need_hidden=True, need_layers=True, need_logits=True, caches=None):
        """Logits plus what distillation and pictures need.

        Returns (logits, hidden_states, layers): hidden_states are the L + 1 tensors
        Hugging Face calls `hidden_states` (embedding output, every layer's output but
        the last, the final normalized output), an empty list unless need_hidden; layers
        holds each layer's attention internals (q, k, v, context and the mechanism's own
        aux, with need_weights), an empty list unless need_layers. need_logits=False skips
        the output layer (logits None). With caches (one LayerCache per layer), idx holds the
        tokens after the cached ones (decoding; see generate).
        """
        B, T = idx.shape
        start = caches[0].length if caches else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence length {start + T} exceeds the model's block_size "
                             f"{self.config.block_size} (its learned positions)")
        positions = torch.arange(start, start + T, device=idx.device) + OPT_POSITION_OFFSET
        x = self.embed_tokens(idx)
        if self.project_in is not None:
            x = self.project_in(x)
        x = self.dropout(x + self.embed_positions(positions))
        hidden_states, layers = [], []
        for number, block in enumerate(self.layers):
            if need_hidden:
                hidden_states.append(x)
            x, internals = block(x, need_layers, caches[number] if caches else None)
            if need_layers:
                layers.append(internals)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        if need_hidden:
            hidden_states.append(x)
        logits = F.linear(x, self.embed_tokens.weight) if need_logits else None  # lm_head: tied
        return logits, hidden_states, layers

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Continue idx (B, T) by sampled tokens, nanoGPT's way (top_k=1 is greedy decoding).

        The prompt runs in one pass that fills a cache per layer; then each new token runs
        alone against the cache, so a token costs what one row of attention costs. The model
        has learned positions up to block_size, so generation stops there: the result is
        (B, T + n) with n = min(max_new_tokens, block_size - T).
        """
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be positive (use top_k=1 for greedy decoding)")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k} must be at least 1 (or None for no cut)")
        if not 1 <= idx.size(1) <= self.config.block_size:
            raise ValueError(f"the prompt has {idx.size(1)} tokens; it needs 1 to {self.config.block_size} "
                             f"(the model's block_size)")
        self.eval()
        caches = [LayerCache() for _ in self.layers]
        tokens = idx
        for _ in range(min(max_new_tokens, self.config.block_size - idx.size(1))):
            logits = self.forward_internals(tokens, need_hidden=False, need_layers=False, caches=caches)[0]
            tokens = sample_next_token(logits[:, -1], temperature, top_k, generator)  # (B, 1)
            idx = torch.cat([idx, tokens], dim=1)
        return idx

    # -------------------------------------------------------------------------
    # loading

    def load_checked_state_dict(self, state_dict, source, strict=True):
        """load_state_dict with errors that name the mismatched tensor and the likely fix."""
        own = self.state_dict()
        for name, tensor in state_dict.items():
            if name in own and own[name].shape != tensor.shape:
                raise ValueError(
                    f"{source}: tensor {name!r} has shape {tuple(tensor.shape)} but this config "
                    f"expects {tuple(own[name].shape)}; the weights were written for a different "
                    f"model shape (check the preset/overrides you pass)")
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        if strict and (missing or unexpected):
            raise ValueError(f"{source}: does not match the config: missing tensors {missing}, "
                             f"unexpected tensors {unexpected}")
        return missing

    @classmethod
    def from_checkpoint(cls, path, **overrides):
        """Load a checkpoint written by train.py (it carries its own config)."""
        return cls.from_checkpoint_dict(read_checkpoint(path), str(path), **overrides)

    @classmethod
    def from_checkpoint_dict(cls, ckpt, source, **overrides):
        """The model of an already-read train.py checkpoint; `source` names it in errors."""
        try:
            config = OPTConfig(**{**ckpt["config"], **overrides})
        except TypeError as e:  # a field this version of model.py does not know
            raise ValueError(f"{source}: its config does not fit this version of model.py ({e})") from None
        model = cls(config)
        # a student checkpoint must hold every tensor; a teacher loaded as a SEA/performer
        # student (attn override) legitimately lacks the new attention parameters
        model.load_checked_state_dict(ckpt["model"], source, strict=not overrides)
        return model

    @classmethod
    def from_pretrained(cls, name_or_dir, cache_dir=None, **overrides):
        """Load a Hugging Face OPT checkpoint from a directory, or download it by hub name."""
        directory = Path(name_or_dir)
        if is_hub_name(name_or_dir):
            directory = download_hf_checkpoint(str(name_or_dir), cache_dir)
        elif not directory.is_dir():
            raise FileNotFoundError(f"{directory} is not a directory (pass a Hugging Face OPT "
                                    f"directory or a hub name such as facebook/opt-125m)")
        hf_config = json.loads(_require_file(directory / "config.json").read_text())
        config = OPTConfig(**{**config_from_hf(hf_config), **overrides})
        state = read_hf_state_dict(directory)
        vocab = json.loads(_require_file(directory / "vocab.json").read_text(encoding="utf-8"))
        state["embed_tokens.weight"] = state["embed_tokens.weight"][opt_ids_for_gpt2_tokens(vocab)]
        model = cls(config)
        model.load_checked_state_dict(state, str(directory), strict=config.attn == "dense")
        return model


# -----------------------------------------------------------------------------
# checkpoints: train.py's own, and Hugging Face OPT

def read_checkpoint(path):
    """torch.load of a train.py checkpoint, with an error that names the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: pass the ckpt.pt written by train.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch.load fails in many ways on a file that is not a checkpoint
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}); it may be "
                         f"truncated or not written by train.py: pass the ckpt.pt that train.py "
                         f"wrote, or train again") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} is not a train.py checkpoint (no 'config'/'model' entries); "
                         f"for a Hugging Face OPT directory use OPT.from_pretrained / --init-from")
    return ckpt


def load_model(path_or_name, **overrides):
    """A train.py checkpoint (file) or a Hugging Face OPT (directory or hub name)."""
    if Path(path_or_name).is_file():
        return OPT.from_checkpoint(path_or_name, **overrides)
    if Path(path_or_name).is_dir() or is_hub_name(path_or_name):
        return OPT.from_pretrained(path_or_name, **overrides)
    raise FileNotFoundError(f"{path_or_name}: no such checkpoint file or directory (pass a ckpt.pt "
                            f"from train.py, a Hugging Face OPT directory, or a hub name such as "
                            f"facebook/opt-125m)")


HF_FILES_URL = "https://huggingface.co/{name}/resolve/main/{file}"


def is_hub_name(name):
    """'facebook/opt-125m' is a hub name; '/data/opt', './opt' or 'opt' are local paths."""
    return re.fullmatch(r"[\w-]+/[\w.-]+", str(name)) is not None and not Path(name).exists()


def _require_file(path):
    if not path.is_file():
        raise FileNotFoundError(f"expected {path.name} in {path.parent} (a Hugging Face OPT "
                                f"checkpoint directory holds config.json, vocab.json and "
                                f"pytorch_model.bin or model.safetensors)")
    return path


def config_from_hf(hf):
    """Translate a Hugging Face OPT config.json into OPTConfig fields."""
    if hf.get("activation_function", "relu") != "relu":
        raise ValueError(f"only ReLU OPT models are supported, got {hf['activation_function']}")
    if hf.get("_remove_final_layer_norm", False) or not hf.get("enable_bias", True):
        raise ValueError("OPT variants without biases or final layer norm are not supported")
    return dict(n_layer=hf["num_hidden_layers"], n_embd=hf["hidden_size"],
                n_head=hf["num_attention_heads"], ffn_dim=hf["ffn_dim"],
                block_size=hf["max_position_embeddings"],
                proj_dim=hf.get("word_embed_proj_dim", hf["hidden_size"]),
                pre_ln=hf.get("do_layer_norm_before", True), vocab_size=GPT2_VOCAB_SIZE)


def read_hf_state_dict(directory):
    """HF keys ('model.decoder.x' or 'decoder.x') -> our keys ('x'); lm_head is tied, dropped."""
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
        _require_file(weights)
    try:
        raw = load(weights)
    except Exception as e:  # truncated downloads and foreign files fail in many ways
        raise ValueError(f"{weights} is not readable ({type(e).__name__}); it may be truncated: "
                         f"download it again") from None
    state = {}
    for key, tensor in raw.items():
        if key == "lm_head.weight":
            continue
        for prefix in ("model.decoder.", "decoder."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = tensor.float()
    return state


def download_hf_checkpoint(name, cache_dir=None):
    """Fetch config.json, vocab.json and the weights of `name` (e.g. facebook/opt-125m)."""
    directory = Path(cache_dir or default_cache_dir()) / "hf" / name.replace("/", "--")
    directory.mkdir(parents=True, exist_ok=True)
    for file in ("config.json", "vocab.json", ("pytorch_model.bin", "model.safetensors")):
        choices = file if isinstance(file, tuple) else (file,)
        if any((directory / f).is_file() for f in choices):
            continue
        errors = []
        for f in choices:
            url = HF_FILES_URL.format(name=name, file=f)
            try:
                print(f"downloading {url}")
                urllib.request.urlretrieve(url, directory / (f + ".part"))
                (directory / (f + ".part")).rename(directory / f)
                break
            except (urllib.error.URLError, OSError) as e:
                errors.append(f"{url}: {e}")
        else:
            raise ConnectionError(
                f"could not download {name!r} ({'; '.join(errors)}). Offline? Put config.json, "
                f"vocab.json and pytorch_model.bin in a directory and pass that directory "
                f"instead (--init-from DIR / --teacher DIR)")
    return directory


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable character map used by vocab.json keys."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


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
