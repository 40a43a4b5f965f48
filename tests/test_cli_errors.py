"""Bad input at every entry point ends in one line that names the problem, never a traceback."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
import eval as evaluate
import train
from model import Decoder, DecoderConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def files(tmp_path, wikitext):
    """A good tiny checkpoint, a truncated copy, a file that is no checkpoint, data folders."""
    model = Decoder(DecoderConfig.preset("tiny", n_layer=1, block_size=32))
    good = tmp_path / "good.pt"
    torch.save(dict(model=model.state_dict(), config=model.config.to_dict()), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    (tmp_path / "garbage.pt").write_text("this is not a checkpoint\n")
    empty = tmp_path / "empty-data"
    empty.mkdir()
    for split in ("train", "valid", "test"):
        (empty / f"wiki.{split}.tokens").write_text(" \n")
    resumable = tmp_path / "resumable"
    resumable.mkdir()
    (resumable / "ckpt.pt").write_bytes(truncated.read_bytes())
    return dict(good=good, truncated=truncated, garbage=tmp_path / "garbage.pt", missing=tmp_path / "missing.pt",
                data=wikitext, empty=empty, nodata=tmp_path / "nowhere", resumable=resumable, out=tmp_path / "out")


TRAIN = ["--max-iters", "2", "--batch-size", "2", "--block-size", "16", "--dtype", "float32"]
CASES = [  # (entry point, flags, text the one-line error must contain)
    ("eval", ["--ckpt", "{garbage}"], "garbage.pt is not a readable checkpoint"),
    ("eval", ["--ckpt", "{truncated}"], "truncated.pt is not a readable checkpoint"),
    ("eval", ["--ckpt", "{missing}"], "missing.pt"),
    ("eval", ["--ckpt", "{good}", "--teacher", "{truncated}"], "truncated.pt is not a readable checkpoint"),
    ("eval", ["--init-from", "{nodata}"], "nowhere"),
    ("eval", ["--ckpt", "{good}", "--block-size", "64"], "--block-size 64"),
    ("eval", ["--ckpt", "{good}", "--batch-size", "0"], "--batch-size"),
    ("eval", ["--ckpt", "{good}", "--data-dir", "{empty}"], "empty"),
    ("eval", ["--ckpt", "{good}", "--data-dir", "{nodata}"], "nowhere"),
    ("bench", ["--bench", "--bench-lengths", "1024,-8"], "--bench-lengths"),
    ("bench", ["--bench-model", "--max-new-tokens", "0"], "--max-new-tokens"),
    ("train", ["--batch-size", "0"], "--batch-size"),
    ("train", ["--max-iters", "-5"], "--max-iters"),
    ("train", ["--eval-iters", "0"], "--eval-iters"),
    ("train", ["--grad-accum", "0"], "--grad-accum"),
    ("train", ["--log-interval", "0"], "--log-interval"),
    ("train", ["--eval-interval", "0"], "--eval-interval"),
    ("train", ["--lr", "nan"], "--lr"),
    ("train", ["--block-size", "4096"], "--block-size 4096"),
    ("train", ["--init-from", "{truncated}"], "truncated.pt is not a readable checkpoint"),
    ("train", ["--method", "sea", "--teacher", "{garbage}"], "garbage.pt is not a readable checkpoint"),
    ("train", ["--resume", "--out-dir", "{resumable}"], "ckpt.pt is not a readable checkpoint"),
    ("train", ["--data-dir", "{empty}"], "empty"),
    ("train", ["--data-dir", "{nodata}"], "nowhere"),
    ("train", ["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "no such device"),
    ("eval", ["--ckpt", "{good}", "--device", "gpu"], "not a device name"),
    ("eval", ["--ckpt", "{good}", "--max-windows", "0"], "--max-windows"),
    ("eval", ["--ckpt", "{good}", "--k", "8"], "--k sets how many keys are kept"),
    ("eval", ["--ckpt", "{good}", "--passkey", "--passkey-lengths", "1024"], "outside 64 .. the model's context"),
    ("eval", ["--ckpt", "{good}", "--passkey", "--passkey-depths", "0,1.5"], "must lie in [0, 1]"),
    ("eval", ["--ckpt", "{good}", "--passkey", "--passkey-depths", "half"], "--passkey-depths"),
    ("train", ["--method", "window", "--teacher", "{good}", "--estimator", "residual"], "--estimator chooses"),
]


@pytest.mark.parametrize("entry,flags,message", CASES, ids=[f"{e} {' '.join(f)}" for e, f, _ in CASES])
def test_bad_input_gives_one_clean_line(files, capsys, entry, flags, message):
    argv = [flag.format(**files) for flag in flags]
    if entry == "train":
        argv = [*TRAIN, "--data-dir", str(files["data"]), "--out-dir", str(files["out"]), *argv]
    with pytest.raises(SystemExit) as exit_info:  # any other exception would be a traceback
        dict(train=train.main, eval=evaluate.main, bench=bench.main)[entry](argv)
    code = exit_info.value.code
    said = (code if isinstance(code, str) else "") + capsys.readouterr().err
    assert code not in (0, None)
    assert message in said
    assert len(said.strip().splitlines()) == 1 and "Traceback" not in said


def test_resume_past_max_iters_and_failed_runs_keep_the_checkpoint(files, capsys):
    common = [*TRAIN, "--data-dir", str(files["data"]), "--out-dir", str(files["out"])]
    train.main(common)
    saved = (files["out"] / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match="leaves nothing to train"):
        train.main([*common, "--resume"])
    with pytest.raises(SystemExit, match="diverged"):
        train.main([*common, "--lr", "1e30", "--warmup-iters", "0", "--grad-clip", "0"])
    assert (files["out"] / "ckpt.pt").read_bytes() == saved


def test_the_real_command_prints_one_line(files):
    result = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--ckpt", str(files["garbage"])],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1
