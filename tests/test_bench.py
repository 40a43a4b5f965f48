import math

import eval as evaluate


def test_benchmark_runs_at_a_tiny_size(capsys):
    results = evaluate.main(["--bench", "--bench-lengths", "64,128", "--bench-heads", "2",
                             "--bench-model-length", "32", "--device", "cpu"])
    out = capsys.readouterr().out
    assert set(results) == {"eager", "sdpa", "performer", "sea-torch"}  # no Triton without CUDA
    for method, rows in results.items():
        assert all(seconds > 0 and peak > 0 for seconds, peak in rows), method
    assert "growth exponent" in out and "whole model" in out and "tokens/s" in out


def test_growth_exponent_fits_a_power_law():
    lengths = [1024, 2048, 4096, 8192, 16384]
    assert math.isclose(evaluate.growth_exponent(lengths, [t ** 2 * 1e-9 for t in lengths]), 2.0)
    assert math.isclose(evaluate.growth_exponent(lengths, [t * 1e-6 for t in lengths], from_length=0), 1.0)
