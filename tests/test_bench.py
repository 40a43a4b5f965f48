import json
import math

import torch

import eval as evaluate


def test_benchmark_runs_at_a_tiny_size(capsys, tmp_path):
    records = evaluate.main(["--bench", "--bench-lengths", "64,128", "--bench-heads", "2",
                             "--bench-model-length", "32", "--device", "cpu", "--json", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    attention = [r for r in records if r["kind"] == "attention"]
    assert {r["method"] for r in attention} == {"eager", "sdpa", "performer", "sea-torch"}  # no Triton on a CPU
    assert len(attention) == 8 and all(r["seconds"] > 0 and r["peak_bytes"] > 0 for r in records)
    assert all(r["ops"] > 0 for r in attention if r["method"] == "sea-torch")  # operator calls per call
    assert {r["method"] for r in records if r["kind"] == "model"} == {"eager", "sea"}
    assert json.loads((tmp_path / "b.json").read_text()) == records
    assert "growth exponent" in out and "whole model" in out and "tokens/s" in out and "operator calls" in out


def test_plain_eager_attention_is_causal_softmax():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
    torch.testing.assert_close(evaluate.plain_eager_attention(q, k, v), expected)


def test_growth_exponent_fits_a_power_law():
    lengths = [1024, 2048, 4096, 8192, 16384]
    assert math.isclose(evaluate.growth_exponent(lengths, [t ** 2 * 1e-9 for t in lengths]), 2.0)
    assert math.isclose(evaluate.growth_exponent(lengths, [t * 1e-6 for t in lengths], from_length=0), 1.0)
