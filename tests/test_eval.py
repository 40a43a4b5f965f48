import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as evaluate
from data import get_tokenizer
from model import Decoder, DecoderConfig
from sea import SEAConfig, grouped_topk, kept_key_mask


def sink_window_mask(T, counts, sinks):
    """(T, T) bool: of row i's counts[i] keys, the first min(sinks, counts[i]) and the rest the most recent."""
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    first = counts.clamp(max=sinks)[:, None]
    return (j <= i) & ((j < first) | (j > i - counts[:, None] + first))


def test_perplexity_is_exp_mean_nll():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig.preset("tiny", n_layer=1, block_size=16)).eval()
    tokens = np.random.default_rng(0).integers(0, 50257, 75).astype(np.uint16)  # 4 full windows + 11
    ppl, scored, window_ppl = evaluate.perplexity(model, tokens, block_size=16, batch_size=3)
    nlls = []
    with torch.no_grad():
        for start in range(0, len(tokens), 16):
            window = torch.tensor(tokens[start:start + 16].astype(np.int64))
            logp = F.log_softmax(model(window[None])[0][0], dim=-1)
            nlls += [-logp[i, window[i + 1]].item() for i in range(len(window) - 1)]
    assert scored == len(nlls) == 4 * 15 + 10
    assert math.isclose(ppl, math.exp(sum(nlls) / len(nlls)), rel_tol=1e-5)
    assert math.isclose(window_ppl[-1], math.exp(sum(nlls[-10:]) / 10), rel_tol=1e-5)  # the short last window


def test_eval_cli_on_checkpoint(wikitext, tmp_path, capsys):
    model = Decoder(DecoderConfig.preset("tiny", n_layer=1, block_size=32))
    torch.save(dict(model=model.state_dict(), config=model.config.to_dict()), tmp_path / "ckpt.pt")
    ppl = evaluate.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--data-dir", str(wikitext), "--split", "valid"])
    out = capsys.readouterr().out
    assert "valid perplexity" in out and "tokens" in out
    assert 1 < ppl < 1e6


def test_recall_window_and_oracle_on_a_hand_made_map():
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                          [0.6, 0.4, 0.0, 0.0],
                          [0.2, 0.7, 0.1, 0.0],
                          [0.1, 0.5, 0.1, 0.3]])[None, None]  # (1, 1, 4, 4)
    mask = torch.tensor([[1, 0, 0, 0],
                         [0, 0, 0, 0],  # a row that kept nothing
                         [1, 0, 1, 0],
                         [0, 1, 0, 0]], dtype=torch.bool)[None, None]
    counts = mask.sum(-1)
    recall, window, sink_window, oracle = evaluate.same_count_recalls(probs, mask, counts, sinks=1)
    torch.testing.assert_close(recall, torch.tensor([[[1.0, 0.0, 0.3, 0.5]]]))
    torch.testing.assert_close(window, torch.tensor([[[1.0, 0.0, 0.8, 0.3]]]))  # row 2: keys 1, 2
    torch.testing.assert_close(sink_window, torch.tensor([[[1.0, 0.0, 0.3, 0.1]]]))  # row 2: keys 0, 2
    torch.testing.assert_close(oracle, torch.tensor([[[1.0, 0.0, 0.9, 0.5]]]))  # row 2: keys 1, 0


def test_sink_window_recall_is_the_mass_under_the_sink_window_mask():
    torch.manual_seed(0)
    T = 30
    probs = torch.randn(2, 3, T, T).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    counts = torch.randint(0, 12, (2, 3, T)).minimum(torch.arange(1, T + 1))
    sink_window = evaluate.same_count_recalls(probs, probs > 0, counts, sinks=4)[2]
    for b, h in ((0, 0), (1, 2)):
        mask = sink_window_mask(T, counts[b, h], 4)
        torch.testing.assert_close(sink_window[b, h], (probs[b, h] * mask).sum(-1))


def test_a_perfect_estimate_keeps_the_bins_with_the_most_teacher_mass():
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 40, 40) * 4
    probs = logits.masked_fill(~torch.ones(40, 40, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    best = evaluate.perfect_estimate_recall(probs, k=2, t_m=8)
    assert torch.allclose(best[:, :, :4], torch.ones(1, 2, 4))  # rows up to sqrt(k T_M) = 4 keys long are dense
    # no other choice of as many (head, bin) cells per row holds more mass, over the heads together
    rows = torch.arange(40)
    for seed in range(5):
        random_keep = grouped_topk(torch.rand(1, 2, 40, 8, generator=torch.Generator().manual_seed(seed)), rows, 2)
        assert ((probs * kept_key_mask(random_keep)).sum(dim=(1, 3)) <= best.sum(1) + 1e-5).all()


def test_k_sets_a_new_budget_for_a_checkpoints_kept_keys(wikitext, tmp_path, capsys):
    torch.manual_seed(0)
    teacher = Decoder(DecoderConfig.preset("tiny", n_layer=1, block_size=64))
    torch.save(dict(model=teacher.state_dict(), config=teacher.config.to_dict()), tmp_path / "teacher.pt")
    student = Decoder(DecoderConfig.preset("tiny", n_layer=1, block_size=64, attn="sea-heuristic",
                                           sea=SEAConfig(t_m=16)))
    student.load_state_dict(teacher.state_dict(), strict=False)
    torch.save(dict(model=student.state_dict(), config=student.config.to_dict()), tmp_path / "ckpt.pt")
    common = ["--ckpt", str(tmp_path / "ckpt.pt"), "--teacher", str(tmp_path / "teacher.pt"), "--data-dir",
              str(wikitext), "--split", "valid", "--block-size", "64", "--max-windows", "2"]
    kept = {}
    for k in ("2", "8"):
        evaluate.main(common + ["--k", k, "--json", str(tmp_path / f"k{k}.json")])
        kept[k] = json.loads((tmp_path / f"k{k}.json").read_text())["kept_per_head_late"]
    assert kept["2"] < kept["8"]


def teacher_and_student(attn):
    """A tiny teacher, a student of it with `attn` (k = 4, T_M = 16) and 6 windows of 64 random tokens and a bit."""
    torch.manual_seed(0)
    teacher = Decoder(DecoderConfig.preset("tiny", n_layer=2, block_size=64)).eval()
    student = Decoder(DecoderConfig.preset("tiny", n_layer=2, block_size=64, attn=attn,
                                           sea=SEAConfig(k=4, t_m=16))).eval()
    student.load_state_dict(teacher.state_dict(), strict=False)
    return teacher, student, np.random.default_rng(0).integers(0, 50257, 64 * 6 + 9).astype(np.uint16)


@pytest.mark.parametrize("attn", ["sea", "sink-window"])
def test_a_row_scores_the_recall_windows_in_the_recall_pass_with_the_same_perplexity(attn):
    teacher, student, tokens = teacher_and_student(attn)
    windows = 5  # more than the recall's 4: the fifth scored apart
    row = evaluate.describe(student, teacher, tokens, 64, 2, "cpu", "float32", max_windows=windows)
    ppl, scored, window_ppl = evaluate.perplexity(student, tokens, 64, 2, max_windows=windows)
    assert "window_nll" not in row and row["kept_per_head"] > 0
    assert row["scored"] == scored == windows * 63
    assert math.isclose(row["ppl"], ppl, rel_tol=1e-5)
    torch.testing.assert_close(torch.tensor(row["window_ppl"]), torch.tensor(window_ppl), rtol=1e-5, atol=0)


def test_the_teachers_rows_sorted_once_give_the_same_mask_statistics():
    teacher, student, tokens = teacher_and_student("sea-heuristic")
    plain = evaluate.mask_statistics(student, evaluate.TeacherAttention(teacher, tokens, 64))
    sorted_once = evaluate.TeacherAttention(teacher, tokens, 64, keep_sorted=True)
    assert evaluate.mask_statistics(student, sorted_once) == plain
    assert 0 < plain["recall"] <= plain["oracle"]


def test_the_passkey_prompt_hides_the_key_at_the_asked_depth_within_the_asked_length():
    tokenizer = get_tokenizer("gpt2")
    per_filler = len(tokenizer.encode_ordinary(" " + evaluate.PASSKEY_FILLER))
    for length in (300, 1000):
        for depth in (0, 0.25, 0.5, 1):
            prompt = evaluate.passkey_prompt(tokenizer, length, depth, 48213)
            room = length - evaluate.ANSWER_TOKENS
            assert room - per_filler < len(prompt.ids) <= room  # as much filler as fits, the answer's room kept
            assert tokenizer.decode(prompt.ids[prompt.needle_at:]).startswith(" The pass key is 48213.")
            # depth d: before filler round(d (n - 1)) of n, as llama.cpp places it (depth 1: before the last)
            assert abs(prompt.needle_at / len(prompt.ids) - depth) < 2.5 * per_filler / len(prompt.ids) + 0.02
            text = tokenizer.decode(prompt.ids)
            assert text.startswith(evaluate.PASSKEY_TASK) and text.endswith(evaluate.PASSKEY_QUESTION)
            assert text.count("48213") == 2


def test_a_passkey_answer_passes_when_its_first_number_is_the_key():
    assert evaluate.passkey_passed(" 48213. Remember it.", 48213)
    assert not evaluate.passkey_passed(" 4821", 48213)
    assert not evaluate.passkey_passed(" 482135", 48213)
    assert not evaluate.passkey_passed(" the key", 48213)
    assert not evaluate.passkey_passed(" 1 48213", 48213)


def test_the_answer_margin_is_the_tokens_logit_over_the_best_other():
    logits = torch.tensor([1.0, 3.0, 2.5, -1.0])
    assert evaluate.answer_margin(logits, 1) == pytest.approx(0.5)  # greedy decoding takes it
    assert evaluate.answer_margin(logits, 2) == pytest.approx(-0.5)
    assert evaluate.answer_margin(logits, 3) == pytest.approx(-4.0)


def test_passkey_end_to_end_on_a_tiny_model(tmp_path, capsys):
    torch.manual_seed(0)
    model = Decoder(DecoderConfig.preset("tiny", n_layer=1, block_size=256))
    torch.save(dict(model=model.state_dict(), config=model.config.to_dict()), tmp_path / "ckpt.pt")
    args = ["--ckpt", str(tmp_path / "ckpt.pt"), "--passkey", "--passkey-lengths", "128,256",
            "--passkey-depths", "0,1", "--passkey-keys", "2", "--json", str(tmp_path / "keys.json"),
            "--plot", str(tmp_path / "keys.png")]
    evaluate.main(args + ["--attn", "sink-window", "--k", "8"])
    out = capsys.readouterr().out
    assert "pass-key retrieval, attn=sink-window, k = 8" in out and "depth 0" in out
    records = json.loads((tmp_path / "keys.json").read_text())["records"]
    assert [(r["length"], r["depth"]) for r in records] == [(128, 0), (128, 0), (128, 1), (128, 1),
                                                             (256, 0), (256, 0), (256, 1), (256, 1)]
    assert all(r["passed"] == evaluate.passkey_passed(r["answer"], r["key"]) for r in records)
    assert all(math.isfinite(r["margin"]) for r in records) and "margin" in out
    assert (tmp_path / "keys.png").stat().st_size > 0
    evaluate.main(args)  # the same keys for the dense model, given the seed
    assert [r["key"] for r in json.loads((tmp_path / "keys.json").read_text())["records"]] == [r["key"] for r in records]


def test_the_heuristics_flags_reach_its_config():
    _, args = evaluate.parse_args(["--init-from", "smollm2-135m", "--attn", "sea-heuristic", "--finalists", "2",
                                   "--overlap"])
    assert (evaluate.swap_config(args).finalists, evaluate.swap_config(args).overlap) == (2, True)
    assert not evaluate.swap_config(evaluate.parse_args(["--init-from", "smollm2-135m"])[1]).overlap


def test_selection_recall_equals_the_whole_map_formula():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig.preset("tiny-llama", n_layer=2, block_size=64)).eval()  # grouped-query heads
    idx = torch.randint(0, model.config.vocab_size, (1, 64))
    config = SEAConfig(k=16, t_m=8, block=4, sub_bins=2)  # 2 cells a head at least: every head keeps keys
    kinds = ["sink-window", "block-mean", "sea-heuristic", "perfect-estimate", "oracle"]
    ours = evaluate.selection_recall(model, kinds, config, idx, pieces=3, rows_per_piece=5)
    firsts = ours[kinds[0]]["rows"]
    assert firsts[0] == 32 and firsts[-1] == 64 - 5
    rows = torch.cat([torch.arange(first, first + 5) for first in firsts])
    with torch.no_grad():
        _, _, layers = model.forward_internals(idx, need_hidden=False)
    H, D = layers[0]["q"].shape[1], layers[0]["q"].shape[-1]
    for kind in kinds:
        chooser = (evaluate.CONTROLS | evaluate.ANALYSIS)[kind](H, D, 64, config)
        for number, layer in enumerate(layers):
            with torch.no_grad():
                mask = chooser(layer["q"], layer["k"], layer["v"], need_weights=True)[1]["kept_mask"][:, :, rows]
            probs, values = layer["probs"][:, :, rows], layer["v"].repeat_interleave(2, dim=1)
            kept = probs * mask
            exact, kept_out = probs @ values, (kept / kept.sum(-1, keepdim=True)) @ values
            error = (kept_out - exact).square().sum(-1).mean() / exact.square().sum(-1).mean()
            figures = ours[kind]["per_layer"][number]
            assert math.isclose(figures["recall"], kept.sum(-1).mean().item(), rel_tol=1e-5), (kind, number)
            assert math.isclose(figures["output_error"], error.item(), rel_tol=1e-4, abs_tol=1e-9), (kind, number)
