import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ("the cat sat on a mat while seven quiet dogs ran across wide green fields "
         "near an old river , and people watched from the stone bridge .").split()


def write_wikitext(folder, layout="tokens", lines=400, seed=0):
    """A made-up WikiText-like folder: wiki.{train,valid,test}.{layout}."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", lines), ("valid", lines // 4), ("test", lines // 4)):
        text = [" = Heading = \n"]
        for _ in range(n):
            start = rng.randrange(len(WORDS))
            text.append(" ".join(WORDS[(start + i) % len(WORDS)] for i in range(rng.randint(5, 20))) + " \n")
        (folder / f"wiki.{split}.{layout}").write_text("".join(text))
    return folder


@pytest.fixture
def wikitext(tmp_path, monkeypatch):
    """A tiny data folder, and a cache folder of the test's own."""
    monkeypatch.setenv("SEA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SEA_DATA_DIR", raising=False)
    return write_wikitext(tmp_path / "wikitext")


@pytest.fixture(autouse=True)
def sparse_step_7_on_short_rows(monkeypatch):
    """Inference runs step 7 as a masked softmax on rows that see few keys (GatedSparseAttention.FEW_KEYS);
    every test's sequence is short, so the tests switch that off and run the sparse path (test_sea checks
    that both agree)."""
    from sea import GatedSparseAttention
    monkeypatch.setattr(GatedSparseAttention, "FEW_KEYS", 0)
