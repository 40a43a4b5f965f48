import pytest
import torch

import data
import eval as evaluate
import train
from model import Decoder, DecoderConfig
from sea import SEAConfig, causal_attention_pieces


@pytest.fixture
def teacher_path(tmp_path):
    torch.manual_seed(0)
    teacher = Decoder(DecoderConfig.preset("tiny", n_layer=2, block_size=64))
    path = tmp_path / "teacher.pt"
    torch.save(dict(model=teacher.state_dict(), config=teacher.config.to_dict()), path)
    return path


def total_loss(student_path, teacher_path, tokens, attention_terms):
    student, teacher = Decoder.from_checkpoint(student_path), Decoder.from_checkpoint(teacher_path)
    objective = train.Objective(student.eval(), teacher.eval(), attention_terms)
    x, y = data.get_batch(tokens, 4, 64, torch.Generator().manual_seed(0), "cpu")
    with torch.no_grad():
        loss, terms = objective(x, y)
    return loss.item(), terms


@pytest.mark.parametrize("method", ["sea", "window", "block-mean", "sea-heuristic", "performer", "reformer"])
def test_distillation_lowers_loss_then_saves_loads_and_evaluates(method, wikitext, teacher_path, tmp_path, capsys):
    out = tmp_path / method
    common = ["--method", method, "--teacher", str(teacher_path), "--data-dir", str(wikitext),
              "--out-dir", str(out), "--batch-size", "4", "--block-size", "64", "--k", "4",
              "--t-m", "16", "--eval-iters", "1", "--log-interval", "3", "--dtype", "float32",
              "--lr", "1e-3", "--warmup-iters", "1", "--n-hashes", "2"]
    baseline = method in ("performer", "reformer")  # the official recipe: no per-layer attention terms
    train.main([*common, "--max-iters", "1"])
    tokens = data.load_tokens("valid", wikitext)
    before, terms = total_loss(out / "ckpt.pt", teacher_path, tokens, attention_terms=not baseline)
    expected = {"lm", "hidden", "kl"} | (set() if baseline else {"dense", "context"})
    assert set(terms) == expected | ({"estimate"} if method == "sea" else set())
    train.main([*common, "--max-iters", "12", "--resume"])
    log = capsys.readouterr().out
    assert "hidden" in log and ("context" in log) != baseline
    assert ("official " + method + " baseline" in log) == baseline  # the recipe line
    assert ("recall" in log) == (method in evaluate.MASKED_KINDS)  # the kept keys' recall at each validation
    after, _ = total_loss(out / "ckpt.pt", teacher_path, tokens, attention_terms=not baseline)
    assert after < before

    student = Decoder.from_checkpoint(out / "ckpt.pt")
    assert student.config.attn == method
    assert student.config.sea == SEAConfig(k=4, t_m=16, nbf=1 if method == "performer" else 8)
    assert (student.config.reformer.bucket_size, student.config.reformer.n_hashes) == (4, 2)
    evaluate.main(["--ckpt", str(out / "ckpt.pt"), "--teacher", str(teacher_path), "--data-dir", str(wikitext),
                   "--block-size", "64", "--split", "valid"])
    report = capsys.readouterr().out
    assert "ratio" in report
    assert ("recall" in report) == (method in evaluate.MASKED_KINDS)


def test_new_attention_parameters_get_ten_times_the_rate(teacher_path):
    args = train.parse_args(["--method", "sea", "--teacher", str(teacher_path), "--k", "4",
                             "--t-m", "16"])
    student = train.build_student(args)
    optimizer = train.make_optimizer(student, args)
    scale_of = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in student.named_parameters():
        assert scale_of[id(p)] == (10.0 if ".mechanism." in name else 0.2), name


def test_plot_writes_png(wikitext, teacher_path, tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    teacher = Decoder.from_checkpoint(teacher_path)
    student = Decoder.from_checkpoint(teacher_path, attn="sea", sea=SEAConfig(k=4, t_m=16))
    evaluate.plot_attention(student, teacher, data.load_tokens("valid", wikitext), 64, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 10_000


def test_distillation_flags_fail_fast(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--method", "sea"])
    assert "--teacher" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--method", "sea", "--teacher", str(tmp_path / "none.pt")])
    assert "no such file" in capsys.readouterr().err


def test_estimator_warm_up_trains_only_the_estimator(wikitext, teacher_path, capsys):
    args = train.parse_args(["--method", "sea", "--teacher", str(teacher_path), "--k", "4", "--t-m",
                             "16", "--block-size", "64", "--batch-size", "2", "--estimator-iters", "3",
                             "--eval-interval", "3", "--log-interval", "1", "--dtype", "float32"])
    student, teacher = train.build_student(args), train.load_teacher(args)
    before = {name: t.clone() for name, t in student.state_dict().items()}
    tokens = data.load_tokens("train", wikitext)
    train.warm_up_estimator(student, teacher, tokens, data.load_tokens("valid", wikitext), args, "cpu")
    after = student.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    estimator = {name for name, _ in student.named_parameters() if train.is_estimator_parameter(name)}
    assert changed == estimator  # every estimator tensor moved, nothing else did (gates, W, copied weights)
    assert any(".positions" in n for n in changed) and any(".decoder." in n for n in changed)
    log = capsys.readouterr().out
    assert "estimator 3/3 | estimate loss" in log and "estimator 3: kept/head" in log


def test_vocabulary_terms_equal_cross_entropy_and_kl():
    torch.manual_seed(0)
    s_logits = (torch.randn(2, 5, 300, dtype=torch.float64) * 3).requires_grad_()
    t_logits, y = torch.randn(2, 5, 300, dtype=torch.float64) * 3, torch.randint(300, (2, 5))
    lm, kl = train.vocabulary_terms(s_logits, t_logits, y)
    s_logp, t_logp = s_logits.flatten(0, 1).log_softmax(-1), t_logits.flatten(0, 1).log_softmax(-1)
    torch.testing.assert_close(lm, torch.nn.functional.nll_loss(s_logp, y.flatten()))
    expected_kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    torch.testing.assert_close(kl, expected_kl)
    torch.testing.assert_close(torch.autograd.grad(kl, s_logits)[0], torch.autograd.grad(expected_kl, s_logits)[0])


def naive_dense_map_loss(q, k, teacher_q, teacher_k):
    """The dense attention term on whole T x T maps: 0.1 KL(teacher || student) per row + MSE."""
    causal = torch.ones(q.size(2), q.size(2), dtype=torch.bool).tril()
    target = (teacher_q @ teacher_k.transpose(-2, -1)).masked_fill(~causal, float("-inf")).softmax(-1)
    scores = (q @ k.transpose(-2, -1)).masked_fill(~causal, torch.finfo(q.dtype).min)
    log_p = scores.log_softmax(-1)
    kl = (torch.xlogy(target, target) - target * log_p).sum(-1).mean()
    return 0.1 * kl + torch.nn.functional.mse_loss(log_p.exp(), target)


@pytest.mark.parametrize("rows_per_piece", [256, 7])
def test_dense_map_loss_in_pieces_equals_whole_maps(rows_per_piece):
    torch.manual_seed(0)
    q, k = (torch.randn(2, 3, 20, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    teacher_q, teacher_k = torch.randn(2, 3, 20, 8, dtype=torch.float64), torch.randn(2, 3, 20, 8, dtype=torch.float64)
    pieces = train.DenseMapLoss.apply(q, k, list(causal_attention_pieces(teacher_q, teacher_k, rows_per_piece)))
    whole = naive_dense_map_loss(q, k, teacher_q, teacher_k)
    torch.testing.assert_close(pieces, whole.float())
    for a, b in zip(torch.autograd.grad(3 * pieces, (q, k)), torch.autograd.grad(3 * whole, (q, k))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_history_and_recall_curves(wikitext, teacher_path, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sea"
    train.main(["--method", "sea", "--teacher", str(teacher_path), "--data-dir", str(wikitext), "--out-dir", str(out),
                "--batch-size", "2", "--block-size", "64", "--k", "4", "--t-m", "16", "--eval-iters", "1",
                "--max-iters", "2", "--eval-interval", "1", "--estimator-iters", "2", "--dtype", "float32"])
    entries = evaluate.read_history(out / "history.jsonl")
    assert [(e["phase"], e["step"]) for e in entries if "estimate_loss" in e] == [("estimator-loss", 2)]
    entries = [e for e in entries if "recall" in e]
    assert [(e["phase"], e["step"]) for e in entries] == [("estimator", 0), ("estimator", 1), ("estimator", 2),
                                                          ("sea", 0), ("sea", 1), ("sea", 2)]  # 0: before distilling
    assert entries[-1]["tokens"] == 2 * 2 * 64 and 0 < entries[-1]["recall_late"] <= entries[-1]["recall"] <= 1
    evaluate.main(["--curves", str(out / "history.jsonl"), "--plot", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_estimator_overfit_trains_on_the_measured_windows_and_stops(wikitext, teacher_path, tmp_path, capsys,
                                                                     monkeypatch):
    def no_training_batches(*args, **kwargs):
        raise AssertionError("the over-fit test must train on the measured validation windows only")
    monkeypatch.setattr(train, "get_batch", no_training_batches)
    out = tmp_path / "overfit"
    common = ["--method", "sea", "--teacher", str(teacher_path), "--data-dir", str(wikitext), "--out-dir", str(out),
              "--batch-size", "2", "--block-size", "64", "--k", "4", "--t-m", "16",
              "--dtype", "float32", "--estimator-lr", "1e-2", "--log-interval", "1"]
    train.main(common + ["--estimator-iters", "12", "--eval-interval", "12", "--estimator-overfit"])
    assert not (out / "ckpt.pt").exists()  # a diagnostic: no distillation, no checkpoint
    log = capsys.readouterr().out
    losses = [float(line.split("estimate loss ")[1].split()[0]) for line in log.splitlines()
              if line.startswith("estimator ") and "estimate loss" in line]
    assert len(losses) == 12 and losses[-1] < 0.8 * losses[0]  # one fixed batch: the loss must fall
    assert [e["step"] for e in evaluate.read_history(out / "history.jsonl") if "recall" in e] == [0, 12]
    with pytest.raises(SystemExit):
        train.main(common + ["--estimator-overfit"])
    assert "--estimator-iters" in capsys.readouterr().err


def test_a_resumed_distillation_equals_one_run(wikitext, teacher_path, tmp_path, monkeypatch):
    """Stopped after a checkpoint and resumed, a run trains on the same windows with the same optimizer
    state and learning rates as one that never stopped: the same weights."""
    common = ["--method", "sea", "--teacher", str(teacher_path), "--data-dir", str(wikitext), "--batch-size", "2",
              "--block-size", "32", "--k", "4", "--t-m", "8", "--eval-iters", "1", "--eval-interval", "2",
              "--max-iters", "4", "--dtype", "float32"]
    train.main([*common, "--out-dir", str(tmp_path / "whole")])
    save = train.save_checkpoint

    def save_then_stop(path, model, optimizer, it, *rest):  # the sitting ends after the checkpoint at step 2
        save(path, model, optimizer, it, *rest)
        if it == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train.main([*common, "--out-dir", str(tmp_path / "split")])
    monkeypatch.setattr(train, "save_checkpoint", save)
    train.main([*common, "--resume", "--out-dir", str(tmp_path / "split")])
    whole, split = (torch.load(tmp_path / name / "ckpt.pt", weights_only=False)["model"] for name in ("whole", "split"))
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], msg=name)


def test_students_trained_side_by_side_equal_each_trained_alone(wikitext, teacher_path, tmp_path, monkeypatch):
    """train_side_by_side shares each step's teacher pass between the students (one pass a window, counted
    here) and gives each the weights its own run gives."""
    def flags(method, where):
        return ["--method", method, "--teacher", str(teacher_path), "--data-dir", str(wikitext), "--batch-size", "2",
                "--block-size", "32", "--k", "4", "--t-m", "8", "--eval-iters", "1", "--max-iters", "3",
                "--open-gates", "--dtype", "float32", "--out-dir", str(tmp_path / where / method)]
    methods = ("sea", "sink-window")
    for method in methods:
        train.main(flags(method, "alone"))
    passes = []
    make_pass = train.run_with_attention_hooks
    monkeypatch.setattr(train, "run_with_attention_hooks", lambda *a, **k: passes.append(1) or make_pass(*a, **k))
    students = train.train_side_by_side([train.parse_args(flags(method, "together")) for method in methods])
    assert len(passes) == 3  # one teacher pass a step for both students
    for method, (student, path) in zip(methods, students):
        alone, together = (torch.load(tmp_path / where / method / "ckpt.pt", weights_only=False)["model"]
                           for where in ("alone", "together"))
        assert path == tmp_path / "together" / method / "ckpt.pt"
        for name in alone:
            torch.testing.assert_close(together[name], alone[name], msg=f"{method}: {name}")
            torch.testing.assert_close(student.state_dict()[name], together[name], rtol=0, atol=0)  # the one saved
    with pytest.raises(ValueError, match="cannot share a teacher pass"):
        train.Objective(None, None, teacher_pass=train.TeacherPass(None, need_layers=False))
    with pytest.raises(ValueError, match="fresh students only"):
        train.train_side_by_side([train.parse_args(flags("sea", "more") + ["--resume"])])
