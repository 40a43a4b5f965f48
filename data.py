"""
The tokenizer and WikiText-2: download, either published layout, a token cache, batches.

    tokens = load_tokens("train")            # a uint16 numpy array of tiktoken gpt2 ids
    x, y = get_batch(tokens, 8, 256, generator, "cpu")

Data: WikiText-2 from a folder (--data-dir, or $SEA_DATA_DIR) in either published layout,
wiki.{split}.raw or wiki.{split}.tokens; without one the raw variant is downloaded. Each
split is tokenized once and cached as a uint16 .bin file in $SEA_CACHE_DIR (default:
.cache/ next to this file), keyed by a hash of the source file. This file imports nothing
of the project's own.
"""

import hashlib
import os
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "valid", "test")
DATA_ENV = "SEA_DATA_DIR"
CACHE_ENV = "SEA_CACHE_DIR"
WIKITEXT2_RAW_URL = "https://wikitext.smerity.com/wikitext-2-raw-v1.zip"
_tokenizer = None


def default_cache_dir():
    """Token cache and downloads: $SEA_CACHE_DIR, else .cache/ next to this file."""
    return Path(os.environ.get(CACHE_ENV, Path(__file__).resolve().parent / ".cache"))


def get_tokenizer():
    """tiktoken's gpt2 BPE; offline it needs $TIKTOKEN_CACHE_DIR pointing at a ready cache."""
    global _tokenizer
    if _tokenizer is None:
        import tiktoken
        try:
            _tokenizer = tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise ConnectionError(
                f"could not load tiktoken's gpt2 encoding ({type(e).__name__}: {e}). Offline? "
                f"Set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached gpt2 files") from e
    return _tokenizer


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


def load_tokens(split, data_dir=None, cache_dir=None):
    """The split tokenized with gpt2, as a uint16 array; tokenized once, then read from cache."""
    cache_dir = Path(cache_dir or default_cache_dir())
    data_dir = data_dir or os.environ.get(DATA_ENV) or download_wikitext2_raw(cache_dir)
    source = find_split_file(data_dir, split)
    raw = source.read_bytes()
    digest = hashlib.sha1(raw).hexdigest()[:16]  # a changed source file gets a new cache entry
    cached = cache_dir / "tokens" / f"{source.name}.{digest}.bin"
    if cached.is_file():
        return np.fromfile(cached, dtype=np.uint16)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{source} is not UTF-8 text ({e}); expected a WikiText-2 split") from e
    if not text.strip():
        raise ValueError(f"{source} is empty; expected a WikiText-2 split")
    print(f"tokenizing {source} ...")
    tokens = np.array(get_tokenizer().encode_ordinary(text), dtype=np.uint16)
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
