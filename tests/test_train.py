import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from model import Decoder
from data import get_batch, load_tokens

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--batch-size", "4", "--block-size", "32", "--eval-iters", "2", "--log-interval", "5",
        "--warmup-iters", "2", "--dtype", "float32"]


def val_loss(model, tokens):
    x, y = get_batch(tokens, 8, 32, torch.Generator().manual_seed(0), "cpu")
    with torch.no_grad():
        return model.eval()(x, y)[1].item()


def test_dense_training_lowers_loss_and_resumes(wikitext, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--method", "dense", "--preset", "tiny", "--data-dir", str(wikitext), "--out-dir", str(out),
            "--dropout", "0.1", *FAST]
    train.main([*args, "--max-iters", "20", "--eval-interval", "10"])
    first = torch.load(out / "ckpt.pt", weights_only=False)
    assert first["iter"] == 20
    model = Decoder.from_checkpoint(out / "ckpt.pt")
    assert model.config.dropout == 0.1
    tokens = load_tokens("valid", wikitext)
    torch.manual_seed(1337)  # the same initial weights train.py started from
    fresh = Decoder(model.config)
    assert val_loss(model, tokens) < val_loss(fresh, tokens) - 1.0
    log = capsys.readouterr().out
    assert "iter 20/20 | loss" in log and "tok/s" in log and "val loss" in log

    train.main([*args, "--max-iters", "30", "--eval-interval", "10", "--resume"])
    assert "resumed from" in capsys.readouterr().out
    assert torch.load(out / "ckpt.pt", weights_only=False)["iter"] == 30


@pytest.mark.parametrize("flags,message", [
    (["--preset", "opt-7b"], "unknown preset"),
    (["--block-size", "4096"], "exceeds the model's 256"),
    (["--init-from", "/no/such/dir"], "no such file"),
    (["--resume"], "no checkpoint"),
    (["--dropout", "1.5"], "must be in [0, 1)"),
])
def test_bad_flags_fail_with_message(wikitext, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data-dir", str(wikitext), "--out-dir", str(tmp_path / "o"), "--max-iters", "1",
                    *flags])
    assert message in capsys.readouterr().err + str(exit_info.value.code)


def test_torchrun_two_processes_gloo(wikitext, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), "--data-dir", str(wikitext), "--out-dir", str(tmp_path / "ddp"),
           "--device", "cpu", "--max-iters", "4", "--eval-interval", "4", *FAST]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 x cpu" in result.stdout
    assert torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=False)["iter"] == 4


@pytest.mark.parametrize("flags,named,where", [
    (["--method", "sea", "--teacher", "{teacher}", "--dropout", "0.1"], "--dropout", "a dense model trained from"),
    (["--method", "sea", "--teacher", "{teacher}", "--preset", "opt-125m"], "--preset", "a dense model trained from"),
    (["--init-from", "{teacher}", "--preset", "tiny"], "--preset", "a dense model trained from scratch"),
    (["--method", "window", "--teacher", "{teacher}", "--sink-bin"], "--sink-bin", "--method sea"),
    (["--method", "performer", "--teacher", "{teacher}", "--block", "8"], "--block", "block-mean or block-bound"),
    (["--method", "sea", "--teacher", "{teacher}", "--sub-bins", "2"], "--sub-bins", "--estimator residual"),
    (["--method", "sea", "--teacher", "{teacher}", "--official-chunks"], "--official-chunks", "--method reformer"),
    (["--method", "performer", "--teacher", "{teacher}", "--open-gates"], "--open-gates", "--method sea"),
    (["--method", "sea", "--teacher", "{teacher}", "--estimator-lr", "1e-3"], "--estimator-lr", "--estimator-iters N"),
    (["--method", "dense", "--k", "8"], "--k", "the students"),
    (["--method", "dense", "--no-attention-terms"], "--attention-terms", "the students"),
])
def test_a_flag_that_does_not_apply_is_an_error(tmp_path, capsys, flags, named, where):
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"")  # only its path is checked before the error
    with pytest.raises(SystemExit):
        train.main([flag.format(teacher=teacher) for flag in flags])
    said = capsys.readouterr().err
    assert said.startswith(f"error: {named} ") and "it applies to" in said and where in said
    assert len(said.strip().splitlines()) == 1


def test_every_default_is_in_the_one_table_and_in_the_help():
    args = train.settle(method="sea", teacher="smollm2-135m", estimator_iters=3)
    assert (args.lr, args.min_lr, args.estimator_lr, args.max_iters, args.warmup_iters, args.eval_interval) == (
        1e-4, 1e-5, 1e-3, 250, 20, 84)
    assert (args.nbf, args.copied_lr_scale, args.attention_terms) == (8, 0.2, True)
    assert args.out_dir == "out/sea-smollm2-135m"
    baseline = train.settle(method="performer", teacher="smollm2-135m")
    assert (baseline.nbf, baseline.copied_lr_scale, baseline.attention_terms) == (1.0, 1.0, False)
    with pytest.raises(ValueError, match="unknown flags"):
        train.settle(method="sea", teacher="smollm2-135m", learning_rate=1e-3)
    help_text = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                               cwd=ROOT).stdout
    assert "(default 600 dense, 250 distilling)" in help_text and "(default 10 x lr)" in help_text
