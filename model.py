"""
A decoder-only transformer in one file, nanoGPT style, for two families chosen by config:
OPT (the Hugging Face `facebook/opt-*` layout) and Llama (SmolLM2 and kin).

What differs between the families is a handful of config fields, not classes:

    field        OPT                               Llama
    norm         LayerNorm                         RMSNorm
    positions    learned table, offset 2           rotary (RoPE) on q and k
    mlp          fc2(relu(fc1(x)))                 fc2(silu(fc_gate(x)) * fc1(x))  (SwiGLU)
    n_kv_head    = n_head                          fewer: grouped-query attention
    bias         yes                               no

The module names mirror OPT's checkpoint keys (minus `model.decoder.`), for both families;
weights.py reads other people's formats (Hugging Face directories, GGUF) into these names.

Attention is pluggable: `DecoderConfig.attn` picks the module that turns (q, k, v) into a
context: "dense" (softmax), "sea" (sea.py), SEA's controls (controls.py: "window", "sink-window",
"block-mean", "block-bound", "sea-heuristic"), "performer" (FAVOR+ linear attention) or "reformer"
(LSH attention, reformer.py); for analysis only, "perfect-estimate" and "oracle" (keys chosen by
the exact attention).
`build_attention` is the one place that switch happens. With grouped-query attention each
query head attends the keys and values of its group: the mechanisms see them repeated per
query head, the decoding cache holds one copy per key/value head.
"""

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from reformer import LSHAttention, ReformerConfig
from controls import ANALYSIS, CONTROLS
from performer import PerformerAttention
from sea import GatedSparseAttention, GrowingRows, SEAAttention, SEAConfig, causal_mask, exact_attention, grouped_matmul
from data import has_gguf_magic
from weights import GPT2_VOCAB_SIZE, LLAMA_FAMILY, PRETRAINED, is_hub_name, read_pretrained

OPT_POSITION_OFFSET = 2  # OPT's learned positions: position p uses row p + 2
ATTENTION_KINDS = ("dense", "sea", *CONTROLS, "performer", "reformer")
ANALYSIS_KINDS = tuple(ANALYSIS)  # need the exact T x T attention: to measure, never to train


@dataclass
class DecoderConfig:
    n_layer: int = 4
    n_embd: int = 128  # hidden size
    n_head: int = 4  # query heads
    ffn_dim: int = 512
    block_size: int = 256  # maximum sequence length (HF: max_position_embeddings)
    n_kv_head: Optional[int] = None  # key/value heads (grouped-query attention); None: n_head
    proj_dim: Optional[int] = None  # word embedding width when it differs (opt-350m: 512)
    pre_ln: bool = True  # norm before each sublayer (HF OPT: do_layer_norm_before; False for opt-350m)
    norm: str = "layernorm"  # or "rmsnorm"
    norm_eps: float = 1e-5
    positions: str = "learned"  # OPT's learned table, or "rotary"
    rope_base: float = 10000.0  # rotary: the wavelength base
    mlp: str = "relu"  # or "swiglu"
    bias: bool = True  # biases in the attention and MLP projections
    tied_output: bool = True  # the output layer is the token embedding
    vocab_size: int = GPT2_VOCAB_SIZE
    tokenizer: str = "gpt2"  # what data.get_tokenizer needs to speak this model's ids
    dropout: float = 0.0
    attn: str = "dense"  # one of ATTENTION_KINDS
    sea: SEAConfig = field(default_factory=SEAConfig)  # knobs for "sea", the windows and "performer"
    reformer: ReformerConfig = field(default_factory=ReformerConfig)  # knobs for "reformer"

    def __post_init__(self):
        if isinstance(self.sea, dict):  # coming back from a checkpoint
            knobs = dict(self.sea)
            if "predictor_length" in knobs:  # checkpoints written before T_M got one name
                knobs["t_m"] = knobs.pop("predictor_length")
            if knobs.pop("pooled_keys", False):  # checkpoints written before the residual estimator
                raise ValueError("a SEA checkpoint with the old pooled-key estimator, which this version no "
                                 "longer builds: train it again with --estimator residual")
            self.sea = SEAConfig(**knobs)
        if isinstance(self.reformer, dict):
            self.reformer = ReformerConfig(**self.reformer)
        for name, allowed in (("attn", ATTENTION_KINDS + ANALYSIS_KINDS), ("norm", ("layernorm", "rmsnorm")),
                              ("positions", ("learned", "rotary")), ("mlp", ("relu", "swiglu"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {allowed}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def kv_heads(self):  # n_kv_head, or one key/value head per query head
        return self.n_kv_head or self.n_head

    @property
    def embedding_width(self):  # proj_dim, or n_embd
        return self.proj_dim or self.n_embd

    @staticmethod
    def preset(name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
        unknown = set(overrides) - set(DecoderConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown DecoderConfig field(s) {sorted(unknown)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self):
        return asdict(self)


PRESETS = {
    # small enough to train on a 2-core CPU in minutes
    "tiny": DecoderConfig(n_layer=4, n_embd=128, n_head=4, ffn_dim=512, block_size=256),
    "tiny-llama": DecoderConfig(n_layer=4, n_embd=128, n_head=4, n_kv_head=2, ffn_dim=352, block_size=256,
                                **LLAMA_FAMILY),
    # the Hugging Face facebook/opt-* hyper-parameters
    "opt-125m": DecoderConfig(n_layer=12, n_embd=768, n_head=12, ffn_dim=3072, block_size=2048),
    "opt-350m": DecoderConfig(n_layer=24, n_embd=1024, n_head=16, ffn_dim=4096, block_size=2048,
                              proj_dim=512, pre_ln=False),
    "opt-1.3b": DecoderConfig(n_layer=24, n_embd=2048, n_head=32, ffn_dim=8192, block_size=2048),
    "opt-2.7b": DecoderConfig(n_layer=32, n_embd=2560, n_head=32, ffn_dim=10240, block_size=2048),
    # SmolLM2-135M's shape (random weights; its trained weights: Decoder.from_pretrained("smollm2-135m"))
    "smollm2-135m": DecoderConfig(n_layer=30, n_embd=576, n_head=9, n_kv_head=3, ffn_dim=1536, block_size=8192,
                                  rope_base=100000.0, vocab_size=49152, tokenizer="smollm2-135m", **LLAMA_FAMILY),
}


# -----------------------------------------------------------------------------
# attention mechanisms: q (B, H, T, D), already scaled, and k, v (B, H_kv, T, D) -> (out (B, H, T, D), aux);
# H_kv < H for grouped-query attention (sea.grouped_matmul)

def grouped(q, k):
    """Whether query heads share key/value heads (SDPA's enable_gqa: it reads each shared head in place)."""
    return q.size(1) != k.size(1)


class DenseAttention(nn.Module):
    """Causal softmax attention. SDPA for speed; eager (the T x T probabilities materialized,
    as Hugging Face's OPT does) when they are wanted, or always with eager=True."""

    def __init__(self, eager=False):
        super().__init__()
        self.eager = eager

    def forward(self, q, k, v, need_weights=False):
        if not (need_weights or self.eager):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0, enable_gqa=grouped(q, k))
            return out, {}
        probs = exact_attention(q, k, torch.arange(q.size(2), device=q.device))  # (B, H, T, T)
        return grouped_matmul(probs.to(v.dtype), v), {"probs": probs}

    def extend(self, q, k, v, row0, state):
        """Decoding: the rows row0 .. row0 + R - 1 (q (B, H, R, D)) over the keys and values of
        every position so far (B, H_kv, row0 + R, D). Nothing to keep but those: state stays None."""
        if row0 == 0:  # a prompt into an empty cache: plain causal attention
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0, enable_gqa=grouped(q, k)), None
        visible = None  # one new row sees every key: no mask (with one, SDPA on a CPU takes a path that copies
        if q.size(2) > 1:  # the shared key/value heads per query head)
            visible = causal_mask(torch.arange(row0, k.size(2), device=q.device), k.size(2))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=1.0, enable_gqa=grouped(q, k)), None


class LayerCache:
    """One layer's decoding cache: the keys and values of every position so far, one per key/value
    head, in buffers of `capacity` positions (the prompt plus the tokens to come, when known), that
    double when full (GrowingRows), and the attention mechanism's own state (SEA's prefix sums, block
    moments and CNN rows, the Performer's sums; see each mechanism's `extend`)."""

    def __init__(self, capacity=0):
        self.keys, self.values = GrowingRows(capacity), GrowingRows(capacity)
        self.state = None

    @property
    def length(self):  # positions cached so far
        return self.keys.length

    def append(self, k, v):
        """Add the new positions' k, v (B, H_kv, n, D); returns views of all of them so far."""
        return self.keys.append(k), self.values.append(v)


def build_attention(config):
    """The one place where `config.attn` picks the attention mechanism."""
    if config.attn == "dense":
        return DenseAttention()
    gated_sparse = {"sea": SEAAttention, **CONTROLS, **ANALYSIS}
    if config.attn in gated_sparse:
        kind = gated_sparse[config.attn]
        return kind(config.n_head, config.head_dim, config.block_size, config.sea)
    if config.attn == "reformer":
        return LSHAttention(config.head_dim, config.block_size, config.reformer)
    return PerformerAttention(config.head_dim, config.sea.nbf)


def rotary_angles(positions, head_dim, base):
    """(cos, sin), each (T, D), for rotary positions: dims i and i + D/2 form a pair turned by the
    angle p * base^(-2i/D) at position p (Hugging Face's layout)."""
    inverse_wavelengths = base ** (-torch.arange(0, head_dim, 2, device=positions.device).double() / head_dim)
    angles = positions.double()[:, None] * inverse_wavelengths  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def rotate(x, rotary):
    """x (B, H, T, D) turned by the (cos, sin) of its positions, pair (i, i + D/2) by pair:
    x cos + [-x2, x1] sin, built in one new tensor of x's size with half-size products beside it (a 32k
    prompt's queries are 75 MB a layer), in the same rounding as the formula written out."""
    cos, sin = (t.to(x.dtype) for t in rotary)  # (T, D)
    half = x.size(-1) // 2
    first, second = x[..., :half], x[..., half:]
    out = x * cos
    out[..., :half] -= second * sin[:, :half]
    out[..., half:] += first * sin[:, half:]
    return out


class Attention(nn.Module):
    """The projections around the mechanism: x -> q, k, v (rotary positions when configured, q scaled
    by D^-1/2 as the mechanisms expect) -> context -> out_proj."""

    def __init__(self, config):
        super().__init__()
        self.head_dim = config.head_dim
        C, kv_width = config.n_embd, config.kv_heads * config.head_dim
        self.q_proj = nn.Linear(C, C, bias=config.bias)
        self.k_proj = nn.Linear(C, kv_width, bias=config.bias)
        self.v_proj = nn.Linear(C, kv_width, bias=config.bias)
        self.out_proj = nn.Linear(C, C, bias=config.bias)
        self.mechanism = build_attention(config)

    def forward(self, x, rotary=None, need_weights=False, cache=None):
        """x (B, T, C) -> (y, internals). rotary: (cos, sin) of the positions, or None (learned
        positions). With a LayerCache, x holds the positions after the cached ones, attended
        together with those."""
        B, T, C = x.shape
        split_heads = lambda t: t.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, heads, T, D)
        q, k, v = split_heads(self.q_proj(x)), split_heads(self.k_proj(x)), split_heads(self.v_proj(x))
        if rotary is not None:
            q, k = rotate(q, rotary), rotate(k, rotary)
        q = q * self.head_dim ** -0.5  # OPT scales inside q_proj: the same numbers
        row0 = 0
        if cache is not None:
            row0 = cache.length
            k, v = cache.append(k, v)  # one copy per key/value head
        if cache is None:
            context, aux = self.mechanism(q, k, v, need_weights=need_weights)
        else:
            context, cache.state = self.mechanism.extend(q, k, v, row0, cache.state)
            aux = {}
        y = self.out_proj(context.transpose(1, 2).reshape(B, T, C))
        internals = dict(aux, q=q, k=k, v=v, context=context) if need_weights else None
        return y, internals


def make_norm(config, width):
    if config.norm == "rmsnorm":
        return nn.RMSNorm(width, eps=config.norm_eps)
    return nn.LayerNorm(width, eps=config.norm_eps)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.pre_ln = config.pre_ln
        self.self_attn = Attention(config)
        # the norms' names are OPT's, the keys of every checkpoint: self_attn_layer_norm is the attention
        # sublayer's norm, final_layer_norm the MLP sublayer's (llama's post_attention_layernorm)
        self.self_attn_layer_norm = make_norm(config, config.n_embd)
        self.fc1 = nn.Linear(config.n_embd, config.ffn_dim, bias=config.bias)
        self.fc_gate = nn.Linear(config.n_embd, config.ffn_dim, bias=config.bias) if config.mlp == "swiglu" else None
        self.fc2 = nn.Linear(config.ffn_dim, config.n_embd, bias=config.bias)
        self.final_layer_norm = make_norm(config, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    MLP_ROWS = 4096  # positions per piece of the MLP without a graph: bounds its (positions x ffn_dim) activations

    def mlp(self, h):
        """h (B, T, C) -> (B, T, C). Each position is its own, so without a graph (inference) it runs in pieces
        of MLP_ROWS positions: the same numbers, with a piece's activations (SmolLM2, 32k positions: 0.6 GB)."""
        if torch.is_grad_enabled() or h.size(1) <= self.MLP_ROWS:
            return self.feed_forward(h)
        return torch.cat([self.feed_forward(piece) for piece in h.split(self.MLP_ROWS, dim=1)], dim=1)

    def feed_forward(self, h):
        if self.fc_gate is not None:  # SwiGLU
            return self.fc2(F.silu(self.fc_gate(h)) * self.fc1(h))
        return self.fc2(F.relu(self.fc1(h)))

    def forward(self, x, rotary=None, need_weights=False, cache=None):
        h = self.self_attn_layer_norm(x) if self.pre_ln else x
        h, internals = self.self_attn(h, rotary, need_weights, cache)
        x = x + self.dropout(h)
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_ln else x
        x = x + self.dropout(self.mlp(h))
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


class Decoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.embedding_width)
        learned = c.positions == "learned"
        self.embed_positions = nn.Embedding(c.block_size + OPT_POSITION_OFFSET, c.n_embd) if learned else None
        needs_projection = c.embedding_width != c.n_embd
        self.project_in = nn.Linear(c.embedding_width, c.n_embd, bias=False) if needs_projection else None
        self.project_out = nn.Linear(c.n_embd, c.embedding_width, bias=False) if needs_projection else None
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.final_layer_norm = make_norm(c, c.n_embd) if c.pre_ln else None  # after the last layer (llama's norm)
        self.lm_head = None if c.tied_output else nn.Linear(c.embedding_width, c.vocab_size, bias=False)
        self.dropout = nn.Dropout(c.dropout)
        self.apply(self._init_weights)
        for block in self.layers:  # SEA's gates keep their own start, not the zero bias given to every linear layer
            if isinstance(block.self_attn.mechanism, GatedSparseAttention):
                block.self_attn.mechanism.reset_gates()

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def open_gates(self):
        """Every layer's gates fully open (GatedSparseAttention.open_gates): a training-free swap, each layer's
        output the exact softmax over its kept keys. Returns the model."""
        for block in self.layers:
            block.self_attn.mechanism.open_gates()
        return self

    def forward(self, idx, targets=None):
        """idx (B, T) token ids -> logits (B, T, vocab), mean cross-entropy or None."""
        logits, _, _ = self.forward_internals(idx, need_hidden=False, need_layers=False)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def forward_internals(self, idx, need_hidden=True, need_layers=True, logits="all", caches=None):
        """Logits plus what distillation and pictures need.

        Returns (logits, hidden_states, layers): hidden_states are the L + 1 tensors
        Hugging Face calls `hidden_states` (embedding output, every layer's output but
        the last, the final normalized output), an empty list unless need_hidden; layers
        holds each layer's attention internals (q, k, v, context and the mechanism's own
        aux), an empty list unless need_layers, which each layer passes on as need_weights. logits:
        every position's ("all"), the last position's only ("last", (B, 1, vocab)) or none (None: the
        output layer skipped).
        With caches (one LayerCache per layer), idx holds the tokens after the cached ones
        (decoding; see generate).
        """
        if logits not in ("all", "last", None):
            raise ValueError(f"logits={logits!r}: choose 'all', 'last' or None")
        B, T = idx.shape
        row0 = caches[0].length if caches else 0
        if row0 + T > self.config.block_size:
            raise ValueError(f"sequence length {row0 + T} exceeds the model's block_size "
                             f"{self.config.block_size} (the longest context it is configured for)")
        positions = torch.arange(row0, row0 + T, device=idx.device)
        x = self.embed_tokens(idx)
        if self.project_in is not None:
            x = self.project_in(x)
        rotary = None
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions + OPT_POSITION_OFFSET)
        else:
            rotary = rotary_angles(positions, self.config.head_dim, self.config.rope_base)
        x = self.dropout(x)
        hidden_states, layers = [], []
        for number, block in enumerate(self.layers):
            if need_hidden:
                hidden_states.append(x)
            x, internals = block(x, rotary, need_layers, caches[number] if caches else None)
            if need_layers:
                layers.append(internals)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        if need_hidden:
            hidden_states.append(x)
        if logits is None:
            return None, hidden_states, layers
        if logits == "last":  # (B, 1, vocab): all that generation needs of a prompt (a 32k one's logits: 6 GB)
            x = x[:, -1:]
        output = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, output), hidden_states, layers

    def next_logits(self, tokens, caches):
        """The last position's logits (B, 1, vocab) of `tokens`, which follow the positions already in `caches`
        (one LayerCache per layer, or None for none): one step of generation, a prompt or a new token."""
        return self.forward_internals(tokens, need_hidden=False, need_layers=False, logits="last", caches=caches)[0]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Continue idx (B, T) by sampled tokens, nanoGPT's way (top_k=1 is greedy decoding).

        The prompt runs in one pass that fills a cache per layer; then each new token runs
        alone against the cache, so a token costs what one row of attention costs. The model
        is configured for contexts up to block_size, so generation stops there: the result is
        (B, T + n) with n = min(max_new_tokens, block_size - T).
        """
        steps = self.decode_steps(idx, max_new_tokens, temperature, top_k, generator)
        return torch.cat([idx, *(tokens for tokens, _ in steps)], dim=1)

    @torch.no_grad()
    def decode_steps(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """generate's steps, one at a time: yields each new token (B, 1) with the logits (B, vocab) it was drawn
        from, so a caller can read how sure the model was (eval.py's pass keys)."""
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be positive (use top_k=1 for greedy decoding)")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k} must be at least 1 (or None for no cut)")
        if not 1 <= idx.size(1) <= self.config.block_size:
            raise ValueError(f"the prompt has {idx.size(1)} tokens; it needs 1 to {self.config.block_size} "
                             f"(the model's block_size)")
        self.eval()
        new_tokens = min(max_new_tokens, self.config.block_size - idx.size(1))
        caches = [LayerCache(capacity=idx.size(1) + new_tokens) for _ in self.layers]
        tokens = idx
        for _ in range(new_tokens):
            logits = self.next_logits(tokens, caches)[:, -1]  # (B, vocab)
            tokens = sample_next_token(logits, temperature, top_k, generator)  # (B, 1)
            yield tokens, logits

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
            config = DecoderConfig(**{**ckpt["config"], **overrides})
        except TypeError as e:  # a field this version of model.py does not know
            raise ValueError(f"{source}: its config does not fit this version of model.py ({e})") from None
        model = cls(config)
        # a student checkpoint must hold every tensor; a teacher loaded as a SEA/performer
        # student (attn override) legitimately lacks the new attention parameters
        model.load_checked_state_dict(ckpt["model"], source, strict=not overrides)
        return model

    @classmethod
    def from_pretrained(cls, name_or_path, **overrides):
        """A pretrained model (weights.py reads it): a PRETRAINED name such as "smollm2-135m", a
        llama GGUF file, a Hugging Face directory (OPT or llama) or a hub name."""
        fields, state = read_pretrained(name_or_path)
        model = cls(DecoderConfig(**{**fields, **overrides}))
        model.load_checked_state_dict(state, str(name_or_path), strict=model.config.attn == "dense")
        return model


# -----------------------------------------------------------------------------
# checkpoints written by train.py

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
                         f"for a Hugging Face directory or a GGUF use Decoder.from_pretrained / --init-from")
    return ckpt


def is_gguf(path):
    """A .gguf file, or any file that starts with GGUF's magic."""
    return path.suffix == ".gguf" or has_gguf_magic(path)


def is_pretrained_source(name_or_path):
    """Whether from_pretrained reads it: a PRETRAINED name, a hub name, a directory or a GGUF file."""
    path = Path(name_or_path)
    return (str(name_or_path) in PRETRAINED or is_hub_name(name_or_path) or path.is_dir()
            or (path.is_file() and is_gguf(path)))


def run_with_attention_hooks(model, x, need_layers=True, **flags):
    """model.forward_internals(x, need_layers=False, **flags) and, when need_layers, each layer's
    attention inputs and output, caught by hooks on the mechanisms: a list of dicts (q, k, v, context),
    q and context (B, H, T, D), k and v (B, H_kv, T, D). The mechanisms run as at inference (SDPA for
    a dense model): no T x T map."""
    captured = []
    keep = lambda mechanism, inputs, output: captured.append(dict(zip("qkv", inputs[:3]), context=output[0]))
    hooks = [block.self_attn.mechanism.register_forward_hook(keep) for block in model.layers] if need_layers else []
    try:
        outputs = model.forward_internals(x, need_layers=False, **flags)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, captured


def load_model(path_or_name, **overrides):
    """A train.py checkpoint (file), or a pretrained model (see Decoder.from_pretrained)."""
    if is_pretrained_source(path_or_name):
        return Decoder.from_pretrained(path_or_name, **overrides)
    if Path(path_or_name).is_file():
        return Decoder.from_checkpoint(path_or_name, **overrides)
    raise FileNotFoundError(f"{path_or_name}: no such checkpoint file or directory (pass a ckpt.pt from "
                            f"train.py, a GGUF file, a Hugging Face directory, a hub name such as "
                            f"facebook/opt-125m, or one of {sorted(PRETRAINED)})")
