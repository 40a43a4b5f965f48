"""
Benchmarks: how fast SEA runs, and in how much memory, against dense attention.

    python bench.py --bench [--plot bench.png]     # the attention alone, 1k..32k (128k on a GPU)
    python bench.py --bench-decode                  # ms per generated token with a cache, OPT-125m shape
    python bench.py --bench-model [--plot p.png]    # SmolLM2-135M's shape: prefill 2k..32k, decoding after it
    python bench.py --bench-model --init-from smollm2-135m --data-dir DIR   # the real model, 1k..8k
    python bench.py --profile                       # where SEA's time goes, step by step, at 2k and 32k
    python bench.py --profile-decode                # where a generated token's time goes, after 2k and 32k

Every measurement runs in a child process of its own, so its peak memory is its own. Models have
random weights unless --init-from names pretrained ones: speed and memory hardly depend on them (SEA's kept
keys come from an untrained estimate, as many as a trained one keeps).
"""

import argparse
import cProfile
import json
import math
import os
import pstats
import resource
import subprocess
import sys
import time
from dataclasses import replace

import torch

from cli import (ArgumentParser, autocast_context, available_device, exit_on_bad_input, length_list, positive_int,
                 write_records)
from controls import CONTROLS
from data import load_tokens
from model import Decoder, DecoderConfig, DenseAttention, LayerCache
from performer import PerformerAttention
from sea import SEAAttention, SEAConfig, causal_mask

BENCH_METHODS = ("eager", "sdpa", "performer", "sea-torch", "sea-triton")


def plain_eager_attention(q, k, v):
    """The baseline eager attention: softmax(masked_fill(q k^T)) @ v in the input dtype, no extra copies."""
    T = q.size(-2)
    scores = (q @ k.transpose(-2, -1)).masked_fill_(~causal_mask(torch.arange(T, device=q.device), T), float("-inf"))
    return scores.softmax(-1) @ v


def attention_under_test(method, heads, length, head_dim, device, dtype, sea):
    """A function that runs one causal attention of `method` on random (1, H, T, D) inputs."""
    q, k, v = (torch.randn(1, heads, length, head_dim, device=device, dtype=dtype) for _ in range(3))
    q = q * head_dim ** -0.5
    if method == "eager":
        return lambda: plain_eager_attention(q, k, v)
    if method == "sdpa":
        module = DenseAttention()
    elif method == "performer":
        module = PerformerAttention(head_dim, sea.nbf)
    else:
        module = SEAAttention(heads, head_dim, length, replace(sea, use_kernel=method == "sea-triton"))
    module = module.to(device).eval()
    return lambda: module(q, k, v)


def model_under_test(attn, length, device, dtype, sea):
    """A function that runs an OPT-125m-shaped forward (random weights) on one sequence."""
    model = Decoder(DecoderConfig.preset("opt-125m", attn="dense" if attn == "eager" else attn, sea=sea))
    for module in model.modules():
        if isinstance(module, DenseAttention):
            module.eager = attn == "eager"
    model = model.to(device).eval()
    idx = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    def run():
        with autocast_context(device, dtype):
            model(idx)
    return run


def time_and_peak_memory(run, device, max_seconds=3.0, max_repeats=5):
    """Median seconds of `run` after a warm-up; peak bytes (CUDA: allocated; CPU: process RSS)."""
    synchronize = synchronizer(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    with torch.no_grad():
        run()  # warm-up, and Triton compilation
        synchronize()
        while not times or (len(times) < max_repeats and sum(times) < max_seconds):
            start = time.perf_counter()
            run()
            synchronize()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], peak_bytes(device)


def synchronizer(device):
    """What waits for the device's queued work before a clock is read (nothing on a CPU)."""
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def peak_bytes(device):
    """The peak memory so far: CUDA memory allocated, or on a CPU the process's peak RSS."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB


def count_calls(run, device):
    """One run under the PyTorch profiler: CUDA kernel launches on a GPU, else PyTorch operator
    calls (every aten:: op, nested ones included), a measure of the host work per call."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        run()
    if device.startswith("cuda"):
        return "launches", sum(1 for e in prof.events() if e.device_type.name == "CUDA")
    return "ops", sum(1 for e in prof.events() if e.name.startswith("aten::"))


def operator_calls(model, step):
    """PyTorch operator calls (aten::, nested ones included) of one run of `step` through `model`: in all, and
    within its layers' attention mechanisms (their `extend`, marked by a profiler range while counting)."""
    from torch.profiler import profile, record_function
    mechanisms = [block.self_attn.mechanism for block in model.layers]
    def marked(extend):
        def run(*args):
            with record_function("attention mechanism"):
                return extend(*args)
        return run
    for mechanism in mechanisms:
        mechanism.extend = marked(mechanism.extend)  # an instance attribute, over the method
    try:
        with torch.no_grad(), profile() as prof:
            step()
    finally:
        for mechanism in mechanisms:
            del mechanism.extend
    def in_mechanism(event):
        while event.cpu_parent is not None:
            event = event.cpu_parent
            if event.name == "attention mechanism":
                return True
        return False
    calls = [event for event in prof.events() if event.name.startswith("aten::")]
    return len(calls), sum(map(in_mechanism, calls))


def bench_child(spec):
    """Runs in the child process: one measurement, printed as JSON."""
    torch.manual_seed(0)
    if spec["kind"] == "decode":
        return print(json.dumps(time_decoding(spec)))
    sea, dtype = SEAConfig(**spec["sea"]), getattr(torch, spec["dtype"])
    if spec["kind"] == "model":
        run = model_under_test(spec["method"], spec["length"], spec["device"], spec["dtype"], sea)
    else:
        run = attention_under_test(spec["method"], spec["heads"], spec["length"], spec["head_dim"],
                                   spec["device"], dtype, sea)
    seconds, peak = time_and_peak_memory(run, spec["device"])
    result = dict(seconds=seconds, peak_bytes=peak)
    if spec.get("count_calls"):
        name, count = count_calls(run, spec["device"])
        result[name] = count
    print(json.dumps(result))


def measure_in_child(spec):
    """{seconds, peak_bytes[, ops | launches]}, or None when the child failed (out of memory, say)."""
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--bench-child", json.dumps(spec)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        print(f"  {spec['method']} at T={spec['length']} failed: {result.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_budget(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def measure_row(length, methods, spec, heads, budget, describe, width):
    """One printed row of a benchmark table: each method measured at `length` in a child process of its
    own (spec(method): what to measure; eager only where its maps for `heads` heads fit), each cell
    describe(result) or why there is none. Returns {method: result} of the measurements that worked."""
    results, cells = {}, []
    for method in methods:
        if method == "eager" and not eager_fits(heads, length, budget):
            cells.append(f"{'(would not fit)':>{width}}")
            continue
        result = measure_in_child(spec(method))
        if result:
            results[method] = result
        cells.append(describe(result) if result else f"{'failed':>{width}}")
    print(f"{length:>7} " + " ".join(cells), flush=True)
    return results


def eager_fits(heads, length, budget):
    """Whether eager attention's float32 scores and probabilities, (heads, T, T) each, fit in 60% of the memory."""
    return 2 * heads * length * length * 4 <= 0.6 * budget


def growth_exponent(lengths, seconds, from_length=8192):
    """Least-squares slope of log(time) against log(T), over T >= from_length when possible."""
    points = [(math.log(t), math.log(s)) for t, s in zip(lengths, seconds) if s is not None]
    late = [(x, y) for (x, y), t in zip(points, lengths) if t >= from_length]
    points = late if len(late) >= 2 else points
    if len(points) < 2:
        return None
    mx, my = sum(x for x, _ in points) / len(points), sum(y for _, y in points) / len(points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def benchmark(lengths, device, dtype, heads=12, head_dim=64, sea=SEAConfig(), model_length=2048, plot=None,
              json_path=None):
    """Latency and peak memory of causal attention alone, every method at every length, then a
    whole OPT-125m-shaped model; each figure from a child process of its own. Returns the records
    (also written to json_path): method, T, device, dtype, seconds, peak bytes, and for SEA the
    kernel launches (CUDA) or operator calls (CPU) of one call."""
    methods = [m for m in BENCH_METHODS if m != "sea-triton" or device.startswith("cuda")]
    budget = memory_budget(device)
    common = dict(kind="attention", heads=heads, head_dim=head_dim, device=device, dtype=dtype,
                  sea=dict(sea.__dict__))
    print(f"attention alone, causal, B=1 H={heads} D={head_dim}, T_M={sea.t_m} "
          f"k={sea.k}, on {device_name(device)}, {dtype}; time (ms) / peak memory (MB)")
    print(f"{'T':>7} " + " ".join(f"{m:>20}" for m in methods))
    records = []
    describe = lambda result: f"{result['seconds'] * 1e3:>10.1f} / {result['peak_bytes'] / 2**20:>7.0f}"
    for length in lengths:
        spec = lambda method: dict(common, method=method, length=length, count_calls=method.startswith("sea"))
        for method, result in measure_row(length, methods, spec, heads, budget, describe, width=20).items():
            records.append(dict(kind="attention", method=method, T=length, device=device_name(device),
                                dtype=dtype, **result))

    seconds_of = lambda method: [next((r["seconds"] for r in records if r["method"] == method and r["T"] == t),
                                      None) for t in lengths]
    print("growth exponent of time vs T (fitted over T >= 8k where measured):")
    for method in methods:
        exponent = growth_exponent(lengths, seconds_of(method))
        print(f"  {method:<11} {'n/a' if exponent is None else f'{exponent:.2f}'}")
    for sea_method in [m for m in methods if m.startswith("sea")]:
        faster = [t for t, s, d in zip(lengths, seconds_of(sea_method), seconds_of("sdpa")) if s and d and s < d]
        print(f"{sea_method} is faster than sdpa from T = {faster[0] if faster else 'never (in this range)'}")
        calls = [(r["T"], r.get("ops", r.get("launches"))) for r in records if r["method"] == sea_method]
        print(f"{sea_method} {'kernel launches' if device.startswith('cuda') else 'operator calls'} per call: "
              + ", ".join(f"{count:,} at T={t}" for t, count in calls))

    print(f"whole model, OPT-125m shape (random weights), one sequence of T={model_length}:")
    for attn in ("eager", "sea"):
        result = measure_in_child(dict(common, kind="model", method=attn, length=model_length))
        if result:
            records.append(dict(kind="model", method=attn, T=model_length, device=device_name(device),
                                dtype=dtype, **result))
            print(f"  {attn:<6} {model_length / result['seconds']:>9,.0f} tokens/s   "
                  f"peak memory {result['peak_bytes'] / 2**20:,.0f} MB")
    if plot:
        attention = [r for r in records if r["kind"] == "attention"]
        plot_against_length(attention, methods, (("seconds", 1e3, "latency (ms)"), ("peak_bytes", 2 ** -20,
                            "peak memory (MB)")), plot, f"causal attention alone: {device_name(device)}, {dtype}")
    if json_path:
        write_records(records, json_path)
    return records



def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores)"


def plot_against_length(records, methods, panels, path, title):
    """Log-log panels against T, one line per method, in the same colour in every panel: panels are (record
    key, scale, axis label)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.3))
    for ax, (key, scale, label) in zip(axes, panels):
        for number, method in enumerate(methods):
            rows = [r for r in records if r["method"] == method and key in r]
            if rows:
                ax.plot([r["T"] for r in rows], [r[key] * scale for r in rows], "o-", label=method,
                        color=f"C{number}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


@torch.no_grad()
def time_decoding(spec):
    """One prefill of spec["length"] tokens, then spec["new_tokens"] greedy tokens, through a model of
    spec["preset"]'s shape with random weights, or the pretrained spec["init_from"] (a prompt of the test
    split's text when spec["data_dir"] is given, else random tokens): dense attention (SDPA) with its
    key/value cache, or spec["method"]'s attention (spec["attn"], spec["sea"]) with its own; `eager` runs
    the prefill alone, its T x T probabilities materialized. Returns the prefill's seconds, the seconds per
    generated token, the PyTorch operator calls of one generated token per layer (in all, and in the attention
    mechanism), and the peak memory of the whole process (CUDA: allocated)."""
    device, method, context, new_tokens = spec["device"], spec["method"], spec["length"], spec["new_tokens"]
    positions = context + new_tokens + 1  # the prompt, the timed tokens, one more whose operator calls are counted
    synchronize = synchronizer(device)
    attn = spec.get("attn", method)
    overrides = dict(attn="dense" if attn == "eager" else attn, sea=SEAConfig(**spec.get("sea", {})))
    if spec.get("init_from"):
        model = Decoder.from_pretrained(spec["init_from"], **overrides)
        # a token after the model's whole context: rotary positions run on (the rows have no table of positions)
        model.config.block_size = max(model.config.block_size, positions)
        if attn in CONTROLS:  # training-free: the gates fully open, as eval.py swaps them in
            model.open_gates()
    else:
        block_size = max(DecoderConfig.preset(spec["preset"]).block_size, positions)
        model = Decoder(DecoderConfig.preset(spec["preset"], block_size=block_size, **overrides))
    model = model.to(device).eval()
    for module in model.modules():
        if isinstance(module, DenseAttention):
            module.eager = attn == "eager"
    prompt = benchmark_prompt(spec, model.config, device)
    caches = [LayerCache(capacity=positions) for _ in model.layers]
    # the last position's logits only, as generation needs: a 32k prompt's every logit would be 6 GB
    step = lambda tokens, caches=caches: model.next_logits(tokens, caches)
    with autocast_context(device, spec["dtype"]):
        step(prompt[:, :64], None)  # warm-up
        synchronize()
        started = time.perf_counter()
        if attn == "eager":
            step(prompt, None)
            synchronize()
            return dict(prefill_seconds=time.perf_counter() - started, peak_bytes=peak_bytes(device))
        token = step(prompt).argmax(-1)
        synchronize()
        prefill, started = time.perf_counter() - started, time.perf_counter()
        for _ in range(new_tokens):
            token = step(token).argmax(-1)
        synchronize()
        per_token = (time.perf_counter() - started) / new_tokens
        calls, in_attention = operator_calls(model, lambda: step(token))
    return dict(prefill_seconds=prefill, seconds_per_token=per_token, calls_per_layer=calls / len(model.layers),
                attention_calls_per_layer=in_attention / len(model.layers), peak_bytes=peak_bytes(device))


def benchmark_prompt(spec, config, device):
    """(1, T) token ids: the test split's first T tokens where spec["data_dir"] names the data, else random ids."""
    if spec.get("data_dir"):
        tokens = load_tokens("test", spec["data_dir"], None, config.tokenizer)
        if len(tokens) < spec["length"]:
            raise ValueError(f"the test split holds {len(tokens):,} tokens, fewer than a prompt of {spec['length']:,}; "
                             f"use shorter --bench-lengths")
        return torch.from_numpy(tokens[:spec["length"]].astype("int64"))[None].to(device)
    return torch.randint(0, config.vocab_size, (1, spec["length"]), device=device)


def decode_benchmark(contexts, device, dtype, new_tokens, json_path=None):
    """Time per generated token after a context, and peak memory, dense with a key/value cache
    against SEA with its cache; each figure from a child process of its own."""
    print(f"decoding with a cache, OPT-125m shape (random weights), on {device_name(device)}, {dtype}: "
          f"ms per generated token (averaged over {new_tokens}) / peak memory (MB)")
    print(f"{'context':>7} {'dense':>20} {'sea':>20}")
    records = []
    describe = lambda result: f"{result['seconds_per_token'] * 1e3:>10.1f} / {result['peak_bytes'] / 2**20:>7.0f}"
    for context in contexts:
        spec = lambda method: dict(kind="decode", preset="opt-125m", method=method, length=context,
                                   new_tokens=new_tokens, device=device, dtype=dtype)
        for method, result in measure_row(context, ("dense", "sea"), spec, 12, memory_budget(device), describe,
                                          width=20).items():
            records.append(dict(kind="decode", method=method, context=context, device=device_name(device),
                                dtype=dtype, **result))
    if json_path:
        write_records(records, json_path)
    return records


LONG_CONTEXT_SEA = dict(t_m=2048, sub_bins=1, finalists=2)  # SEA as the 8,192-token quality table runs it (README)
RANDOM_WEIGHTS_ROWS = {"eager": dict(attn="eager"), "dense": dict(attn="dense"), "sea": dict(attn="sea")}
PRETRAINED_ROWS = {"dense": dict(attn="dense"),
                   "sea-heuristic k=256": dict(attn="sea-heuristic", sea=dict(LONG_CONTEXT_SEA, k=256)),
                   "sea-heuristic k=64": dict(attn="sea-heuristic", sea=dict(LONG_CONTEXT_SEA, k=64))}


def model_benchmark(lengths, device, dtype, new_tokens, plot=None, json_path=None, init_from=None, data_dir=None):
    """SmolLM2-135M, a whole prefill at each length and ms per generated token after it, with the peak memory
    and a generated token's operator calls per layer; each figure from a child process of its own. With random
    weights (init_from None): eager attention, dense SDPA and SEA (the paper's estimator); with the pretrained
    `init_from` (the model a user runs): dense and our estimate untrained (sea-heuristic) in the long-context
    configuration at k = 256 and 64, the prompt the test split's text when `data_dir` is given."""
    rows = PRETRAINED_ROWS if init_from else RANDOM_WEIGHTS_ROWS
    model = Decoder.from_pretrained(init_from) if init_from else Decoder(DecoderConfig.preset("smollm2-135m"))
    config, weights = model.config, 4 * model.num_params()  # float32 bytes
    del model
    budget = memory_budget(device)
    name = init_from or "SmolLM2-135M's shape (random weights)"
    print(f"{name}, prompt {'the test split' if data_dir else 'random tokens'}, on {device_name(device)}, {dtype}: "
          f"prefill (s) / ms per generated token (over {new_tokens}) / peak memory (MB) / operator calls a layer "
          f"for a token (of them in the attention mechanism)")
    print(f"{'T':>7} " + " ".join(f"{method:>40}" for method in rows))
    records = []
    def describe(result):
        per_token = f"{result['seconds_per_token'] * 1e3:.0f}" if "seconds_per_token" in result else "-"
        calls = "-"
        if "calls_per_layer" in result:
            calls = f"{result['calls_per_layer']:.0f} ({result['attention_calls_per_layer']:.0f})"
        return f"{result['prefill_seconds']:>9.2f} / {per_token:>6} / {result['peak_bytes'] / 2**20:>7.0f} / {calls:>10}"

    for length in lengths:
        spec = lambda method: dict(kind="decode", preset="smollm2-135m", method=method, length=length,
                                   new_tokens=new_tokens, device=device, dtype=dtype, init_from=init_from,
                                   data_dir=data_dir, **rows[method])
        for method, result in measure_row(length, rows, spec, config.n_head, budget, describe, width=40).items():
            records.append(dict(kind="smollm2", method=method, T=length, device=device_name(device), dtype=dtype,
                                init_from=init_from, **rows[method], **result))
    bandwidth = read_bandwidth()
    print(f"the floor of a generated token, every byte it must read once at {bandwidth / 1e9:.1f} GB/s "
          f"(this machine's read bandwidth):")
    sea_budgets = {method: SEAConfig(**row.get("sea", {})).k for method, row in rows.items() if "sea" in row["attn"]}
    for length in lengths:
        floor = decoding_floor(config, weights, length, sea_budgets, bandwidth)
        print(f"{length:>7} " + "  ".join(f"{method} {n / 2**20:,.0f} MB, {s * 1e3:.0f} ms"
                                          for method, (n, s) in floor.items()))
        records += [dict(kind="floor", method=method, T=length, bytes_per_token=n, seconds_per_token=s,
                         bandwidth=bandwidth) for method, (n, s) in floor.items()]
    of = lambda method, t, key: next((r.get(key) for r in records if r["method"] == method and r["T"] == t
                                      and r["kind"] == "smollm2"), None)
    for method in sea_budgets:
        print(f"{method} / dense:  " + ";  ".join(
            f"T={t}: prefill {of(method, t, 'prefill_seconds') / of('dense', t, 'prefill_seconds'):.2f}, "
            f"decoding {of(method, t, 'seconds_per_token') / of('dense', t, 'seconds_per_token'):.2f}"
            for t in lengths if of(method, t, "prefill_seconds") and of("dense", t, "prefill_seconds")))
    if plot:
        panels = (("prefill_seconds", 1, "prefill (s)"), ("seconds_per_token", 1e3, "decoding (ms per token)"),
                  ("peak_bytes", 2 ** -20, "peak memory (MB)"))
        plot_against_length([r for r in records if r["kind"] == "smollm2"], list(rows), panels, plot,
                            f"{name}, whole model: {device_name(device)}, {dtype}")
    if json_path:
        write_records(records, json_path)
    return records


def read_bandwidth(megabytes=512, repeats=5):
    """Bytes per second this machine reads from memory: the best of a few sums over a buffer far larger
    than the caches (what a decoding step's weights and keys cost at the least)."""
    buffer = torch.ones(megabytes * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - started)
    return buffer.numel() * 4 / best


def decoding_floor(config, weights, context, sea_budgets, bandwidth):
    """The least a generated token can cost: the bytes it must read, at `bandwidth`. Every weight once
    (`weights` bytes); dense attention every cached key and value; SEA about k keys and values per query
    head of each layer (its estimate's state is small), for each {method: k} of sea_budgets. Returns
    {method: (bytes, seconds)}, dense first."""
    per_position = 2 * config.n_layer * config.kv_heads * config.head_dim * 4  # one position's keys and values
    kept = lambda k: 2 * config.n_layer * config.n_head * min(k, context) * config.head_dim * 4
    read = {"dense": weights + context * per_position} | {method: weights + kept(k) for method, k in sea_budgets.items()}
    return {method: (n, n / bandwidth) for method, n in read.items()}


def profile_decoding(lengths, new_tokens=8, n_layer=2, top=8):
    """Where a generated token's time goes after each context, dense and SEA, SmolLM2's shape with
    n_layer of its 30 layers (random weights; the layers are alike, so a layer's figures scale by
    30 / n_layer): the PyTorch operators that took the most time, in ms per token."""
    from torch.profiler import ProfilerActivity, profile
    records = []
    for length in lengths:
        for method in ("dense", "sea"):
            torch.manual_seed(0)
            config = DecoderConfig.preset("smollm2-135m", n_layer=n_layer, attn=method,
                                          block_size=max(8192, length + new_tokens + 1))
            model = Decoder(config).eval()
            caches = [LayerCache(capacity=length + new_tokens + 1) for _ in model.layers]
            step = lambda tokens: model.next_logits(tokens, caches).argmax(-1)
            with torch.no_grad():
                token = step(torch.randint(0, config.vocab_size, (1, length)))
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    started = time.perf_counter()
                    for _ in range(new_tokens):
                        token = step(token)
                    per_token = (time.perf_counter() - started) / new_tokens
            averages = prof.key_averages()
            ops = sorted(averages, key=lambda e: -e.self_cpu_time_total)[:top]
            spent = {e.key: e.self_cpu_time_total / 1e3 / new_tokens for e in ops}  # ms per token
            calls = sum(e.count for e in averages if e.key.startswith("aten::")) / new_tokens
            print(f"{method} after {length} tokens, {n_layer} layers: {per_token * 1e3:.1f} ms a token "
                  f"(under the profiler), {calls:.0f} operator calls; the most expensive, ms a token:")
            for name, ms in spent.items():
                print(f"  {name:<40} {ms:>8.2f}")
            records.append(dict(kind="profile-decode", method=method, T=length, n_layer=n_layer,
                                ms_per_token=per_token * 1e3, operator_calls=calls, ms_by_operator=spent))
    return records


PROFILED_STEPS = (("1-2 linear estimate and encoder", "encode"), ("3 decoder (CNN)", "compressed_scores"),
                  ("5 grouped top-k", "grouped_topk"), ("6 decompress", "decompress"),
                  ("7 sparse attention", "sparse_attention"), ("kept keys per head (statistics)", "per_head"))


def profile_steps(lengths, heads=12, head_dim=64, sea=SEAConfig()):
    """Where one SEA call's time goes (the PyTorch path, random inputs, no_grad): cProfile's time in
    each step's function of sea.py; the rest is step 4, the gates and the mix of step 8, and the loop."""
    records = []
    for length in lengths:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, heads, length, head_dim) for _ in range(3))
        module = SEAAttention(heads, head_dim, length, replace(sea, use_kernel=False)).eval()
        profiler = cProfile.Profile()
        with torch.no_grad():
            module(q[:, :, :256], k[:, :, :256], v[:, :, :256])  # warm-up
            started = time.perf_counter()
            profiler.runcall(module, q * head_dim ** -0.5, k, v)
            total = time.perf_counter() - started
        in_sea = {}  # seconds in each function of sea.py, its calls included
        for (path, _, name), (_, _, _, seconds, _) in pstats.Stats(profiler).stats.items():
            if path.endswith("sea.py"):
                in_sea[name] = in_sea.get(name, 0.0) + seconds
        print(f"SEA attention alone, T={length}, B=1 H={heads} D={head_dim}, T_M={sea.t_m} k={sea.k}: "
              f"{total:.2f} s under cProfile")
        steps = {step: in_sea.get(name, 0.0) for step, name in PROFILED_STEPS}
        steps["the rest (4, 8, the loop)"] = total - sum(steps.values())
        for step, seconds in steps.items():
            print(f"  {step:<34} {seconds:>7.3f} s  {seconds / total:>5.0%}")
        records.append(dict(kind="profile", T=length, total_seconds=total, steps=steps))
    return records


def parse_args(argv):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--bench", action="store_true", help="latency/memory of the attention alone")
    what.add_argument("--bench-decode", action="store_true",
                      help="time per generated token with a cache, dense against SEA, after 1k..8k tokens")
    what.add_argument("--bench-model", action="store_true",
                      help="SmolLM2-135M's shape: prefill 2k..32k with eager, dense and SEA, and decoding after it")
    what.add_argument("--profile", action="store_true", help="SEA's time per step (default at 2k and 32k)")
    what.add_argument("--profile-decode", action="store_true",
                      help="a generated token's time by operator, dense and SEA, SmolLM2's shape with 2 of its layers "
                           "(default after 2k and 32k)")
    what.add_argument("--bench-child", help=argparse.SUPPRESS)  # one measurement, in a child process
    p.add_argument("--bench-lengths", type=length_list,
                   help="comma-separated sequence lengths (defaults: --bench 1k..32k on a CPU, 1k..128k on a GPU; "
                        "--bench-decode 1k..8k; --bench-model 2k..32k; --profile 2k, 32k)")
    p.add_argument("--bench-heads", type=positive_int, default=12, help="--bench, --profile: heads")
    p.add_argument("--bench-model-length", type=positive_int, default=2048,
                   help="--bench: sequence length of the whole-model line (OPT-125m shape)")
    p.add_argument("--max-new-tokens", type=positive_int, default=16, help="--bench-decode, --bench-model: "
                                                                           "generated tokens to time")
    p.add_argument("--init-from", help="--bench-model: pretrained weights (smollm2-135m, or a llama GGUF file) instead "
                                       "of random ones; rows dense and sea-heuristic at k = 256 and 64 (default lengths 1k..8k)")
    p.add_argument("--data-dir", help="--bench-model: the prompt is the test split's text from this WikiText-2 folder "
                                      "(default: random tokens)")
    p.add_argument("--json", help="also write every measurement to this JSON file")
    p.add_argument("--plot", help="--bench, --bench-model: PNG file of time and memory against T")
    p.add_argument("--device", type=available_device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default float16 on CUDA, float32 on a CPU")
    return p, p.parse_args(argv)


def run(args):
    if args.bench_child:
        return bench_child(json.loads(args.bench_child))
    dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    if args.bench:
        longest = 17 if args.device.startswith("cuda") else 15  # 128k on a GPU, 32k on a CPU
        lengths = args.bench_lengths or [2 ** n for n in range(10, longest + 1)]
        return benchmark(lengths, args.device, dtype, heads=args.bench_heads,
                         model_length=args.bench_model_length, plot=args.plot, json_path=args.json)
    if args.bench_decode:
        lengths = args.bench_lengths or [1024, 2048, 4096, 8192]
        return decode_benchmark(lengths, args.device, dtype, args.max_new_tokens, args.json)
    if args.bench_model:
        lengths = args.bench_lengths or ([1024, 2048, 4096, 8192] if args.init_from else [2048, 4096, 8192, 16384, 32768])
        return model_benchmark(lengths, args.device, dtype, args.max_new_tokens, args.plot, args.json,
                               args.init_from, args.data_dir)
    if args.profile_decode:
        records = profile_decoding(args.bench_lengths or [2048, 32768], args.max_new_tokens)
    else:
        records = profile_steps(args.bench_lengths or [2048, 32768], heads=args.bench_heads)
    if args.json:
        write_records(records, args.json)
    return records


def main(argv=None):
    _, args = parse_args(sys.argv[1:] if argv is None else argv)
    return exit_on_bad_input(lambda: run(args))


if __name__ == "__main__":
    main()
