import json
import math

import torch

import bench
from controls import HeuristicBinAttention
from model import LayerCache
from sea import GatedSparseAttention, SEAConfig, row_cell_budget, row_layout


def test_benchmark_runs_at_a_tiny_size(capsys, tmp_path):
    records = bench.main(["--bench", "--bench-lengths", "64,128", "--bench-heads", "2",
                          "--bench-model-length", "32", "--device", "cpu", "--json", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    attention = [r for r in records if r["kind"] == "attention"]
    assert {r["method"] for r in attention} == {"eager", "sdpa", "performer", "sea-torch"}  # no Triton on a CPU
    assert len(attention) == 8 and all(r["seconds"] > 0 and r["peak_bytes"] > 0 for r in records)
    assert all(r["ops"] > 0 for r in attention if r["method"] == "sea-torch")  # operator calls per call
    assert {r["method"] for r in records if r["kind"] == "model"} == {"eager", "sea"}
    assert json.loads((tmp_path / "b.json").read_text()) == records
    assert "growth exponent" in out and "whole model" in out and "tokens/s" in out and "operator calls" in out


def test_decode_benchmark_runs_at_a_tiny_size(capsys):
    records = bench.main(["--bench-decode", "--bench-lengths", "16", "--max-new-tokens", "2", "--device", "cpu"])
    assert {r["method"] for r in records} == {"dense", "sea"}
    assert all(r["seconds_per_token"] > 0 and r["prefill_seconds"] > 0 and r["peak_bytes"] > 0
               and r["context"] == 16 for r in records)
    assert "ms per generated token" in capsys.readouterr().out


def test_model_benchmark_runs_on_smollm2s_shape(capsys, tmp_path):
    records = bench.main(["--bench-model", "--bench-lengths", "32", "--max-new-tokens", "2", "--device", "cpu",
                          "--json", str(tmp_path / "m.json"), "--plot", str(tmp_path / "m.png")])
    measured, floors = records[:3], records[3:]
    assert [r["method"] for r in measured] == ["eager", "dense", "sea"]
    assert all(r["prefill_seconds"] > 0 and r["peak_bytes"] > 0 and r["T"] == 32 for r in measured)
    assert all(r["seconds_per_token"] > 0 for r in measured[1:]) and "seconds_per_token" not in measured[0]
    assert [(r["kind"], r["method"]) for r in floors] == [("floor", "dense"), ("floor", "sea")]
    weights = 4 * sum(p.numel() for p in bench.Decoder(bench.DecoderConfig.preset("smollm2-135m")).parameters())
    cache = 2 * 30 * 3 * 64 * 4 * 32  # keys and values of 32 positions, 30 layers of 3 key/value heads
    assert floors[0]["bytes_per_token"] == weights + cache and floors[1]["bytes_per_token"] > weights
    assert json.loads((tmp_path / "m.json").read_text()) == records and (tmp_path / "m.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "sea / dense:  T=32: prefill" in out and "the floor of a generated token" in out


def test_decoding_profile_names_the_operators(capsys):
    records = bench.main(["--profile-decode", "--bench-lengths", "40", "--max-new-tokens", "2"])
    assert [(r["method"], r["T"]) for r in records] == [("dense", 40), ("sea", 40)]
    assert all(r["ms_per_token"] > 0 and r["operator_calls"] > 0 and any("aten::" in op for op in r["ms_by_operator"])
               for r in records)
    assert "ms a token" in capsys.readouterr().out


def test_profile_splits_seas_time_into_its_steps(capsys):
    records = bench.main(["--profile", "--bench-lengths", "300", "--bench-heads", "2"])
    steps = records[0]["steps"]
    assert records[0]["T"] == 300 and len(steps) == len(bench.PROFILED_STEPS) + 1
    assert all(seconds > 0 for step, seconds in steps.items() if step != "the rest (4, 8, the loop)")
    assert math.isclose(sum(steps.values()), records[0]["total_seconds"]) and steps["the rest (4, 8, the loop)"] > 0
    assert "7 sparse attention" in capsys.readouterr().out


def test_plain_eager_attention_is_causal_softmax():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
    torch.testing.assert_close(bench.plain_eager_attention(q, k, v), expected)


def test_growth_exponent_fits_a_power_law():
    lengths = [1024, 2048, 4096, 8192, 16384]
    assert math.isclose(bench.growth_exponent(lengths, [t ** 2 * 1e-9 for t in lengths]), 2.0)
    assert math.isclose(bench.growth_exponent(lengths, [t * 1e-6 for t in lengths], from_length=0), 1.0)


def mechanism_calls_of_a_step(T, finalists=1, layout_known=False):
    """The attention mechanism's operator calls for the token after T, a one-layer tiny-llama with ours untrained
    (sea-heuristic, gates open, T_M 16, 2 key blocks a bin): the row's layout and budgets worked out in the step,
    or (layout_known) before it, as in a model of many layers, whose first layer works them out for all."""
    torch.manual_seed(0)
    sea = SEAConfig(k=4, t_m=16, sub_bins=2, finalists=finalists)
    config = bench.DecoderConfig.preset("tiny-llama", n_layer=1, block_size=2048, attn="sea-heuristic", sea=sea)
    model = bench.Decoder(config).eval().open_gates()
    idx = torch.randint(0, 1000, (1, T + 1))
    caches = [LayerCache(capacity=T + 1)]
    with torch.no_grad():
        model.next_logits(idx[:, :T], caches)
    row_layout.cache_clear()
    row_cell_budget.cache_clear()
    if layout_known:
        row_layout(T, sea.t_m, sea.sub_bins, torch.device("cpu"), sea.overlap)
        for keys_per_head in {sea.k, finalists * sea.k}:
            row_cell_budget(T, config.n_head, keys_per_head, sea.t_m)
    return bench.operator_calls(model, lambda: model.next_logits(idx[:, T:], caches))[1]


def test_a_decoding_step_of_ours_stays_within_its_operator_calls():
    """Measured at 229 and 334 (273 and 378 with float64 prefix sums of the keys in place of KeyBlocks): the
    heuristic's block logits and spread bonus about 70 calls, its bins' scores in one scatter about 50, steps 4-7
    95 (with finalists 200). Issue 34 asks for 100 a layer in all (the model around the mechanism makes about 210
    of its own); this bound keeps what is reached."""
    assert mechanism_calls_of_a_step(1500, layout_known=True) <= 300
    assert mechanism_calls_of_a_step(1500, finalists=2, layout_known=True) <= 400


def test_a_decoding_step_of_ours_makes_as_many_operator_calls_however_long_the_context(monkeypatch):
    one_row = [mechanism_calls_of_a_step(T) for T in (100, 1500)]
    monkeypatch.setattr(HeuristicBinAttention, "extend", GatedSparseAttention.extend)  # the eight steps in chunks
    assert one_row[0] == one_row[1] < mechanism_calls_of_a_step(1500)
