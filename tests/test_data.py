import numpy as np
import pytest

import data
from data import find_split_file, load_tokens


def test_tokenize_cache_and_reuse(wikitext, tmp_path, monkeypatch):
    tokens = load_tokens("train", wikitext)
    assert tokens.dtype == np.uint16 and len(tokens) > 1000
    text = (wikitext / "wiki.train.tokens").read_text()
    assert data.get_tokenizer().decode(tokens.tolist()) == text
    cached = list((tmp_path / "cache" / "tokens").glob("wiki.train.tokens.*.bin"))
    assert len(cached) == 1

    # a second run reads the cache and never calls the tokenizer
    monkeypatch.setattr(data, "get_tokenizer", lambda: pytest.fail("re-tokenized"))
    assert np.array_equal(load_tokens("train", wikitext), tokens)


def test_changed_source_is_retokenized(wikitext, tmp_path):
    before = load_tokens("valid", wikitext)
    (wikitext / "wiki.valid.tokens").write_text("something new entirely \n")
    after = load_tokens("valid", wikitext)
    assert len(after) < len(before)
    assert len(list((tmp_path / "cache" / "tokens").glob("wiki.valid.tokens.*.bin"))) == 2


def test_raw_layout_and_env_var(tmp_path, monkeypatch):
    from conftest import write_wikitext
    folder = write_wikitext(tmp_path / "raw", layout="raw")
    monkeypatch.setenv("SEA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SEA_DATA_DIR", str(folder))
    assert find_split_file(folder, "test").name == "wiki.test.raw"
    assert len(load_tokens("test")) > 100


def test_missing_split_names_expected_files(wikitext):
    (wikitext / "wiki.test.tokens").unlink()
    with pytest.raises(FileNotFoundError, match=r"wiki\.test\.raw.*wiki\.test\.tokens"):
        load_tokens("test", wikitext)


def test_missing_folder_and_empty_file(wikitext, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokens("test", tmp_path / "nowhere")
    (wikitext / "wiki.test.tokens").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        load_tokens("test", wikitext)
