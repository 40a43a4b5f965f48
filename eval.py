"""
Evaluate a model on WikiText-2.

    python eval.py --ckpt out/dense-tiny/ckpt.pt                 # test perplexity
    python eval.py --init-from facebook/opt-125m --split valid   # a Hugging Face OPT
    python eval.py --ckpt out/sea-tiny/ckpt.pt --teacher out/dense-tiny/ckpt.pt --plot sea.png
                   # + ratio to the teacher, SEA mask statistics, attention-map picture

Perplexity protocol (the paper's): the split's text tokenized once, cut into
non-overlapping windows of --block-size tokens; every window scores the next-token
predictions inside it; perplexity = exp(mean token NLL).
"""

import argparse
import json
import math
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from cli import (ArgumentParser, autocast_context, available_device, exit_on_bad_input, length_list, non_negative_int,
                 number_list, positive_float, positive_int, write_records)
from data import SPLITS, check_long_enough, get_tokenizer, load_tokens
from controls import ANALYSIS, CONTROLS, perfect_estimate_bins
from model import ANALYSIS_KINDS, ATTENTION_KINDS, load_model, run_with_attention_hooks
from sea import KeyBlocks, SEAConfig, estimated_attention_map, exact_attention, grouped_matmul, kept_key_mask

MASKED_KINDS = tuple(kind for kind in ATTENTION_KINDS + ANALYSIS_KINDS
                     if kind not in ("dense", "performer", "reformer"))  # kept keys to compare with the teacher's
RECALL_WINDOWS = 4  # mask statistics use the split's first windows, this many


def split_windows(tokens, block_size, max_windows=None):
    """The split cut into non-overlapping windows of block_size tokens (the last may be shorter; a
    lone last token predicts nothing and is dropped), the first max_windows of them when given."""
    ids = torch.as_tensor(tokens.astype("int64"))
    windows = [w for w in ids.split(block_size) if len(w) >= 2]
    return windows[:max_windows]


@torch.no_grad()
def perplexity(model, tokens, block_size, batch_size=8, device="cpu", dtype="float32", max_windows=None, known=()):
    """Returns (perplexity, tokens scored, each window's own perplexity) over the split's non-overlapping
    windows of block_size tokens (its first max_windows windows when given). known: the mean token NLL of
    the first windows, already computed (by mask_statistics' pass over them), not run again."""
    device = torch.device(device)
    check_long_enough(tokens, 2, "split to score")
    model.eval()
    windows = split_windows(tokens, block_size, max_windows)
    window_nll = (list(known) + [0.0] * len(windows))[:len(windows)]  # each window's mean token NLL
    started = last_report = time.time()
    for first in range(len(known), len(windows), batch_size):
        if time.time() - last_report > 60:  # a progress line a minute on long evaluations
            last_report = time.time()
            print(f"  perplexity: {first} of {len(windows)} windows, {last_report - started:.0f}s", flush=True)
        batch = range(first, min(first + batch_size, len(windows)))
        for length in sorted({len(windows[i]) for i in batch}):  # the last window may be shorter
            same = [i for i in batch if len(windows[i]) == length]
            x = torch.stack([windows[i] for i in same]).to(device)
            with autocast_context(device, dtype):
                logits, _ = model(x)
            for i, mean in zip(same, mean_token_nll(logits, x)):
                window_nll[i] = mean
    scored = [len(w) - 1 for w in windows]
    total = sum(nll * n for nll, n in zip(window_nll, scored))
    return math.exp(total / sum(scored)), sum(scored), [math.exp(nll) for nll in window_nll]


def mean_token_nll(logits, x):
    """Each window's mean next-token NLL: logits (b, L, V) of the windows x (b, L) -> b floats."""
    # (b * (L - 1), V) rows: the (b, V, L - 1) layout gives a less exact log-softmax (1e-4 in ppl here)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="none")
    return nll.view(len(x), -1).mean(1).tolist()


def sample_windows(tokens, block_size, count):
    """The first `count` non-overlapping windows of the split, (count, block_size) int64."""
    usable = min(count, len(tokens) // block_size)
    return torch.as_tensor(tokens[:usable * block_size].astype("int64")).view(usable, block_size)


@torch.no_grad()
def attention_internals(student, teacher, idx):
    """Per layer: the teacher's attention probabilities and the student's internals."""
    _, _, teacher_layers = teacher.eval().forward_internals(idx, need_hidden=False, logits=None)
    _, _, student_layers = student.eval().forward_internals(idx, need_hidden=False, logits=None)
    return teacher_layers, student_layers


def same_count_recalls(probs, kept_mask, counts, sinks=4, top_mass=None):
    """Teacher mass (B, H, T) on the kept keys, and on the same number of keys chosen three other ways.

    probs (B, H, T, T) the teacher's attention; kept_mask (B, H, T, T); counts (B, H, T) keys kept
    per (head, row). Returns (recall, window, sink_window, oracle): the mass on the kept keys, on the
    `counts` most recent keys of each row, on the first min(sinks, counts) keys plus the most recent
    rest, and on the teacher's own top `counts` keys (an upper bound). top_mass: top_key_mass(probs), when
    already computed.
    """
    T = probs.size(-1)
    recall = (probs * kept_mask).sum(-1)
    kept_any = counts > 0
    last = (counts - 1).clamp_min(0).unsqueeze(-1)
    top_mass = top_key_mass(probs) if top_mass is None else top_mass
    oracle = top_mass.gather(-1, last).squeeze(-1) * kept_any
    prefix = probs.cumsum(-1)  # prefix[.., i, x] = mass on keys 0..x
    mass_before = lambda x: prefix.gather(-1, (x - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1) * (x > 0)  # keys < x
    rows = torch.arange(T, device=probs.device)
    row_total = prefix.diagonal(dim1=-2, dim2=-1)  # (B, H, T): mass on keys 0..i
    window = row_total - mass_before(rows + 1 - counts)  # keys i - counts + 1 .. i
    first = counts.clamp(max=sinks)
    sink_window = mass_before(first) + row_total - mass_before(torch.maximum(rows + 1 - counts + first, first))
    return recall, window, sink_window, oracle


def top_key_mass(probs):
    """(B, H, T, T): [.., i, n] the mass of row i's n + 1 largest attention weights, probs (B, H, T, T)."""
    return probs.sort(dim=-1, descending=True).values.cumsum(-1)


def perfect_estimate_recall(probs, k, t_m):
    """The recall SEA's bins allow: the grouped top-k of step 5 run on the teacher's own attention
    mass per bin, as if the estimate were perfect. probs (B, H, T, T) -> (B, H, T)."""
    rows = torch.arange(probs.size(-1), device=probs.device)
    return (probs * kept_key_mask(perfect_estimate_bins(probs, rows, k, t_m))).sum(-1)


class TeacherAttention:
    """The teacher's attention on the split's first `windows` windows, and the perfect estimate's recall on it,
    which the mask statistics of every student reuse: computed once for all the rows of a table. probs[layer]
    (B, H, T, T); with keep_sorted, also each row's sorted cumulative mass for the oracle's column,
    top_mass[layer] (top_key_mass: one sort for all the rows, at the memory of a second copy of the maps); with
    dtype (a perplexity run's), the teacher's mean token NLL on each of those windows, window_nll."""

    @torch.no_grad()
    def __init__(self, teacher, tokens, block_size, windows=RECALL_WINDOWS, keep_sorted=False, dtype=None):
        self.idx = sample_windows(tokens, block_size, windows).to(next(teacher.parameters()).device)
        with autocast_context(self.idx.device, dtype or "float32"):
            logits, _, layers = teacher.eval().forward_internals(self.idx, need_hidden=False,
                                                                 logits="all" if dtype else None)
        self.window_nll = mean_token_nll(logits, self.idx) if dtype else []  # the teacher's own row reuses them
        self.probs = [layer["probs"] for layer in layers]
        self.top_mass = [top_key_mass(probs) if keep_sorted else None for probs in self.probs]
        self.perfect = {}  # (k, T_M) -> each layer's perfect-estimate recall (B, H, T)

    def perfect_recall(self, k, t_m):
        if (k, t_m) not in self.perfect:
            self.perfect[k, t_m] = [perfect_estimate_recall(probs, k, t_m) for probs in self.probs]
        return self.perfect[k, t_m]


@torch.no_grad()
def mask_statistics(student, teacher_attention, dtype=None):
    """Kept keys per query per head and mask recall, over all rows and over the second half of
    each window (where SEA is sparse), on the windows of teacher_attention (TeacherAttention). Recall is
    the share of the teacher's attention mass on the kept keys; beside it, the same number of keys per
    (head, row) taken as the most recent ones (window), as the first SEAConfig.sinks keys plus the
    most recent (sink_window) and as the teacher's own top keys (oracle), and the recall SEA's
    budget and bins would give with a perfect estimate (best_estimate). Names ending in _late are
    the second halves'. With dtype (a perplexity run's), the same pass scores its windows too: window_nll,
    each one's mean token NLL, so that describe() need not run them again."""
    idx = teacher_attention.idx
    with autocast_context(idx.device, dtype or "float32"):
        logits, _, student_layers = student.eval().forward_internals(idx, need_hidden=False,
                                                                     logits="all" if dtype else None)
    T, half = idx.size(1), idx.size(1) // 2
    row_lengths = torch.arange(1, T + 1, device=idx.device)
    sea = student.config.sea
    per_layer = []
    for probs, top_mass, best, s_layer in zip(teacher_attention.probs, teacher_attention.top_mass,
                                              teacher_attention.perfect_recall(sea.k, sea.t_m), student_layers):
        counts = s_layer["kept_per_head"]  # (B, H, T)
        recall, window, sink_window, oracle = same_count_recalls(probs, s_layer["kept_mask"], counts, sea.sinks,
                                                                 top_mass)
        measures = dict(kept_per_head=counts.float(), kept_fraction=counts / row_lengths, recall=recall,
                        window=window, sink_window=sink_window, oracle=oracle, best_estimate=best)
        stats = {}
        for name, value in measures.items():
            stats[name] = value.mean().item()
            stats[name + "_late"] = value[:, :, half:].mean().item()
        per_layer.append(stats)
    averages = {name: sum(layer[name] for layer in per_layer) / len(per_layer) for name in per_layer[0]}
    return dict(averages, per_layer=per_layer, **(dict(window_nll=mean_token_nll(logits, idx)) if dtype else {}))


@torch.no_grad()
def selection_recall(model, kinds, sea_config, idx, pieces=4, rows_per_piece=128):
    """How well each way of choosing keys (a control or an analysis kind of `kinds`) does on a dense model's
    own attention, layer by layer: every kind chooses from the same q, k, v (caught by hooks in one forward
    pass over the window idx (1, T)), so nothing but the choice differs. On `pieces` pieces of
    `rows_per_piece` rows spread over the window's second half, per layer and kind: recall (the attention
    mass on the kept keys) and the output error (|o_kept - o|^2 over the layer's mean |o|^2, o_kept the
    softmax over the kept keys), and the seconds the kind took to choose. Only one piece's map, (B, H, rows, T),
    exists at a time, so the peak memory is O(rows T) however long the window."""
    _, layers = run_with_attention_hooks(model.eval(), idx, need_hidden=False, logits=None)
    T = idx.size(1)
    firsts = [T // 2 + (T // 2 - rows_per_piece) * n // max(1, pieces - 1) for n in range(pieces)]
    H, D = layers[0]["q"].shape[1], layers[0]["q"].shape[-1]
    choosers = {kind: (CONTROLS | ANALYSIS)[kind](H, D, 1, sea_config) for kind in kinds}
    per_layer = {kind: [] for kind in kinds}
    for layer in layers:
        q, k, v = layer["q"], layer["k"], layer["v"]
        sums = {kind: torch.zeros(3) for kind in kinds}  # recall, squared error, seconds
        out_norm = 0.0
        for first in firsts:
            rows = torch.arange(first, first + rows_per_piece, device=q.device)
            q_rows, keys, values = q[:, :, rows], k[:, :, :rows[-1] + 1], v[:, :, :rows[-1] + 1]
            probs = exact_attention(q_rows, keys, rows)  # (B, H, R, T')
            exact = grouped_matmul(probs, values)
            out_norm += exact.square().sum(-1).mean().item()
            for kind, chooser in choosers.items():
                started = time.perf_counter()
                blocks = KeyBlocks() if chooser.uses_key_blocks() else None
                mask = chooser.choose_keys(q_rows, keys, None, rows, blocks)[0].mask(keys.size(2))
                seconds = time.perf_counter() - started
                kept = probs * mask
                recall = kept.sum(-1, keepdim=True)
                error = (grouped_matmul(kept / recall.clamp_min(1e-30), values) - exact).square().sum(-1).mean()
                sums[kind] += torch.tensor([recall.mean().item(), error.item(), seconds])
        for kind in kinds:
            recall, error, seconds = (sums[kind] / pieces).tolist()
            per_layer[kind].append(dict(recall=recall, output_error=error / (out_norm / pieces),
                                        seconds_per_row=seconds / rows_per_piece))
    return {kind: dict(recall=statistics.fmean(r["recall"] for r in rows),
                       output_error=statistics.fmean(r["output_error"] for r in rows),
                       seconds_per_row=sum(r["seconds_per_row"] for r in rows), per_layer=rows, rows=firsts,
                       rows_per_piece=rows_per_piece)
            for kind, rows in per_layer.items()}


def evaluate_selection(args, model):
    """--selection-recall: selection_recall on the split's first --max-windows windows (1 by default), a table
    and with --json the figures per layer, with --plot the picture."""
    if model.config.attn != "dense":
        raise ValueError(f"--selection-recall compares choices on a dense model's own attention; this model has "
                         f"attn={model.config.attn}")
    kinds = args.selection_recall
    block_size = args.block_size or model.config.block_size
    tokens = load_tokens(args.split, args.data_dir, args.cache_dir, model.config.tokenizer)
    check_long_enough(tokens, block_size * (args.max_windows or 1), "split to analyse")
    config = swap_config(args)
    started, windows = time.time(), []
    for idx in sample_windows(tokens, block_size, args.max_windows or 1):
        windows.append(selection_recall(model, kinds, config, idx[None].to(args.device)))
        print(f"  window {len(windows)}: {time.time() - started:.0f}s", flush=True)
    rows = {kind: dict(recall=statistics.fmean(w[kind]["recall"] for w in windows),
                       output_error=statistics.fmean(w[kind]["output_error"] for w in windows),
                       seconds_per_row=statistics.fmean(w[kind]["seconds_per_row"] for w in windows),
                       per_layer=[w[kind]["per_layer"] for w in windows]) for kind in kinds}
    print(f"choices on the dense model's own attention, {len(windows)} window(s) of {block_size} tokens, k = {config.k}, "
          f"T_M = {config.t_m}, sub-bins {config.sub_bins}, finalists {config.finalists}"
          f"{', overlapping runs' if config.overlap else ''}, blocks of {config.block}; "
          f"late rows {windows[0][kinds[0]]['rows']}"
          f" (+{windows[0][kinds[0]]['rows_per_piece']} each)\n{'method':<18} {'recall':>7} {'output error':>13} "
          f"{'ms a row (30 layers)':>21}")
    for kind, row in rows.items():
        print(f"{kind:<18} {row['recall']:>7.3f} {row['output_error']:>13.3f} {1000 * row['seconds_per_row']:>21.2f}")
    if args.json:
        write_records(dict(block_size=block_size, sea=vars(config), windows=len(windows), methods=rows), args.json)
    if args.plot:
        plot_selection(rows, args.plot, f"{block_size} tokens, k = {config.k}, T_M = {config.t_m}")
    return rows


def plot_selection(rows, path, title):
    """Recall and output error layer by layer (the first window's), one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for kind, row in rows.items():
        layers = row["per_layer"][0]
        top.plot([layer["recall"] for layer in layers], "o-", markersize=3, label=kind)
        bottom.semilogy([layer["output_error"] for layer in layers], "o-", markersize=3, label=kind)
    top.set(ylabel="attention mass on the kept keys", title=f"late rows, layer by layer: {title}")
    bottom.set(ylabel="output error (relative)", xlabel="layer")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
    top.legend(fontsize=8)
    save_figure(fig, path)


def format_mask_statistics(stats):
    return (f"kept/head {stats['kept_per_head']:.1f} (late rows {stats['kept_per_head_late']:.1f}, "
            f"{100 * stats['kept_fraction_late']:.1f}% of the row) | recall {stats['recall']:.3f} "
            f"(late {stats['recall_late']:.3f}) | same-count window {stats['window']:.3f} "
            f"({stats['window_late']:.3f}) | sink-window {stats['sink_window']:.3f} ({stats['sink_window_late']:.3f}) "
            f"| oracle {stats['oracle']:.3f} ({stats['oracle_late']:.3f}) | perfect estimate "
            f"{stats['best_estimate']:.3f} ({stats['best_estimate_late']:.3f})")


HEAD_KINDS = ("sink", "local", "content")  # head_kinds' three scores, in order


def head_kinds(probs, k, sinks):
    """What each head of one layer does on its late rows (the second half), for picking heads to show.
    probs (B, H, T, T) -> three (H,) tensors: the mass on the first `sinks` keys (sink heads), on
    the k most recent keys (local heads), and content: the mass the teacher's own top k keys hold
    beyond what the sink-window of k keys holds (heads that attend by content score high)."""
    B, H, T, _ = probs.shape
    counts = torch.full((B, H, T), k, device=probs.device).minimum(torch.arange(1, T + 1, device=probs.device))
    _, window, sink_window, oracle = same_count_recalls(probs, probs > 0, counts, sinks)
    late = lambda x: x[:, :, T // 2:].mean((0, 2))
    return late(probs[..., :sinks].sum(-1)), late(window), late(oracle - sink_window)


def plot_attention(student, teacher, tokens, block_size, path, layer=None, head=None, shown_per_kind=3):
    """Two rows of pictures on the split's first window. Top: one head as the teacher, SEA's
    estimate and SEA's kept keys see it; by default the head that attends most by content
    (head_kinds' content score, over all layers). Bottom: the teacher's strongest sink heads,
    local heads and content heads side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    idx = sample_windows(tokens, block_size, 1).to(next(student.parameters()).device)
    teacher_layers, student_layers = attention_internals(student, teacher, idx)
    sea = student.config.sea
    kinds = torch.stack([torch.stack(head_kinds(layer["probs"], sea.k, sea.sinks)) for layer in teacher_layers])
    L, _, H = kinds.shape  # (layers, 3 kinds, heads)
    strongest = [(number, *divmod(flat, H)) for number in range(len(HEAD_KINDS))
                 for flat in kinds[:, number].flatten().topk(min(shown_per_kind, L * H)).indices.tolist()]
    chosen = layer is None and head is None
    if chosen:
        layer, head = strongest[-shown_per_kind][1:]  # the first content head
    layer, head = layer % L if layer is not None else L - 1, head or 0
    s_layer = student_layers[layer]
    fig = plt.figure(figsize=(16, 8.2))
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.3, 0.7])
    panels = [("teacher attention", teacher_layers[layer]["probs"][0, head]),
              ("SEA estimated attention", estimated_attention_map(s_layer["scores"])[0, head]),
              ("SEA kept keys", s_layer["kept_mask"][0, head].float())]
    for ax, (title, image) in zip(top.subplots(1, 3), panels):
        draw_map(ax, image, title, log_scale="attention" in title)
    why = (f"the most content-driven head, its top {sea.k} keys holding {kinds[layer, 2, head]:.2f} more of a late "
           f"row's mass than {sea.sinks} sinks + the recent ones" if chosen else "")
    top.suptitle(f"layer {layer}, head {head}{': ' + why if why else ''}; first window ({idx.size(1)} tokens), "
                 f"attention on a log10 scale")
    axes = bottom.subplots(1, len(strongest))
    for ax, (number, kind_layer, kind_head) in zip(axes, strongest):
        draw_map(ax, teacher_layers[kind_layer]["probs"][0, kind_head],
                 f"{HEAD_KINDS[number]}\nL{kind_layer} H{kind_head}: {kinds[kind_layer, number, kind_head]:.2f}",
                 log_scale=True, small=True)
    bottom.suptitle(f"the teacher's strongest heads of each kind, late rows: sink (mass on the first {sea.sinks} "
                    f"keys), local (on the {sea.k} most recent), content (what its top {sea.k} keys add over "
                    f"the sink-window)")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path} (top row: layer {layer}, head {head})")


def plot_layer_recall(rows, path):
    """Late-row recall layer by layer, one line per row of describe() that kept keys (its
    per_layer figures), and the sink-window's as a dashed line, from the first such row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    masked = {name: row["per_layer"] for name, row in rows.items() if "per_layer" in row}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, layers in masked.items():
        ax.plot([layer["recall_late"] for layer in layers], "o-", markersize=3, label=name)
    first = next(iter(masked.values()))
    ax.plot([layer["sink_window_late"] for layer in first], "k--", label="same-count sink-window")
    ax.set_xlabel("layer")
    ax.set_ylabel("teacher attention mass on the kept keys")
    ax.set_title("late-row recall per layer")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def save_figure(fig, path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def draw_map(ax, image, title, log_scale, small=False):
    """One attention map (or kept-key mask) as an image, queries down, keys across."""
    shown = image.clamp_min(1e-4).log10() if log_scale else image
    ax.imshow(shown.cpu().numpy(), cmap="viridis" if log_scale else "gray_r", interpolation="nearest")
    ax.set_title(title, fontsize=8 if small else 11)
    if small:
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        ax.set_xlabel("key")
        ax.set_ylabel("query")


def read_history(path, figure="recall"):
    """The validation records train.py appended to <out-dir>/history.jsonl, which must hold `figure`."""
    lines = Path(path).read_text().splitlines()
    entries = [json.loads(line) for line in lines if line.strip()]
    if not any(figure in entry for entry in entries):
        whose = ("a student that keeps keys (sea, a control), trained with its recall (not --no-recall)"
                 if figure == "recall" else "a distillation")
        raise ValueError(f"{path} holds no {figure} figures: pass the history.jsonl of {whose}")
    return entries


def plot_curves(paths, path, labels=None):
    """Training curves against tokens trained on (the estimator warm-up, then distillation), one color
    per run. Left: the warm-up's estimate loss (a running mean over 10 logged steps). Right: the
    late-row recall of the kept keys (solid), of the same-count sink-window (dashed) and of the
    perfect estimate (dotted)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (loss_ax, recall_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    for number, history in enumerate(paths):
        entries = read_history(history)
        label = labels[number] if labels else Path(history).parent.name
        losses = [e for e in entries if "estimate_loss" in e]
        smooth = [statistics.fmean(e["estimate_loss"] for e in losses[max(0, n - 9):n + 1]) for n in range(len(losses))]
        line, = loss_ax.plot([e["tokens"] for e in losses], smooth, "-", label=label)
        entries = [e for e in entries if "recall" in e]
        warm_up = max([e["tokens"] for e in entries if e["phase"] == "estimator"], default=0)
        tokens = [e["tokens"] + (warm_up if e["phase"] != "estimator" else 0) for e in entries]
        recall_ax.plot(tokens, [e["recall_late"] for e in entries], "o-", color=line.get_color(), label=label)
        for name, style in (("sink_window_late", "--"), ("best_estimate_late", ":")):
            recall_ax.plot(tokens, [e[name] for e in entries], style, color=line.get_color())
    loss_ax.set_ylabel("estimate loss (running mean of 10 logged steps)")
    loss_ax.set_title("the estimator warm-up's loss")
    recall_ax.set_ylabel("teacher attention mass on the kept keys")
    recall_ax.set_title("recall, second half of each validation window")
    for ax in (loss_ax, recall_ax):
        ax.set_xlabel("tokens trained on (estimator warm-up, then distillation)")
        ax.grid(True, alpha=0.3)
    recall_ax.legend(title="solid: kept keys, dashed: same-count sink-window, dotted: perfect estimate",
                     fontsize=8, title_fontsize=8)
    save_figure(fig, path)


def plot_validation(paths, path, labels):
    """Validation loss against distillation steps, one line per run (its history.jsonl), labelled `labels`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for history, label in zip(paths, labels):
        entries = [e for e in read_history(history, "val_loss") if "val_loss" in e]
        ax.plot([e["step"] for e in entries], [e["val_loss"] for e in entries], "o-", label=label)
    ax.set_xlabel("distillation step")
    ax.set_ylabel("validation loss (v1 text)")
    ax.set_title("the students' validation loss while distilled")
    ax.grid(True, alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def describe(model, teacher, tokens, block_size, batch_size, device, dtype, teacher_ppl=None, max_windows=None,
             teacher_attention=None, known=()):
    """One results row: perplexity on the split's first max_windows windows (all by default), ratio to
    the teacher, and the mask statistics of a student that keeps keys (on teacher_attention, of these tokens,
    built here when not given; the pass that takes them scores its windows for the perplexity too). known: the
    model's mean token NLL on the first windows where already computed (the teacher's, by its TeacherAttention).
    tokens: the whole split's length; scored: the tokens predicted."""
    stats = {}
    if teacher is not None and model.config.attn in MASKED_KINDS:
        teacher_attention = teacher_attention or TeacherAttention(teacher, tokens, block_size)
        stats = mask_statistics(model.to(device), teacher_attention, dtype)
        scored_here = stats.pop("window_nll")  # the split's first windows when the block sizes agree
        known = scored_here if teacher_attention.idx.size(1) == block_size else []
    ppl, scored, window_ppl = perplexity(model, tokens, block_size, batch_size, device, dtype, max_windows, known)
    row = dict(attn=model.config.attn, ppl=ppl, window_ppl=window_ppl, tokens=len(tokens), scored=scored,
               block_size=block_size, windows=len(window_ppl), of_windows=len(split_windows(tokens, block_size)))
    if teacher is not None:
        teacher_ppl = teacher_ppl or perplexity(teacher, tokens, block_size, batch_size, device, dtype, max_windows)[0]
        row["ratio"] = ppl / teacher_ppl
    return dict(row, **stats)


TRAINING_WIDTH = 19  # the training column: "none", "warm-up 20 windows", "distilled 30 steps"
NAME_WIDTH = {False: 16, True: 26}  # the method column, without the training column and with it (longer names)


def table_header(mask_statistics=True, training=False):
    """The header of format_row's table, with the mask statistics' columns or without, with a column saying
    how each row was trained (its row["training"]) or without."""
    header = f"{'method':<{NAME_WIDTH[training]}} " + (f"{'training':<{TRAINING_WIDTH}} " if training else "")
    header += f"{'ppl':>8} {'ratio':>6}"
    if mask_statistics:
        header += (f"   {'kept keys/head':>14}   recall (late rows): {'kept':>5} {'window':>6} {'sinks':>6} "
                   f"{'perfect':>7} {'oracle':>6}   all rows: {'kept':>5}")
    return header


def format_row(name, row):
    """One line of table_header's table: how the row was trained if it says, perplexity, ratio to the teacher,
    mask statistics (the kept keys' recall; the same count as a window, as a sink-window, the perfect
    estimate's, the oracle's)."""
    training = f"{row['training']:<{TRAINING_WIDTH}} " if "training" in row else ""
    text = f"{name:<{NAME_WIDTH['training' in row]}} {training}{row['ppl']:>8.2f} {row.get('ratio', float('nan')):>6.3f}"
    if "kept_per_head" in row:
        kept = f"{row['kept_per_head_late']:.1f} ({100 * row['kept_fraction_late']:.1f}%)"
        text += (f"   {kept:>14}   {'':>19} {row['recall_late']:>5.3f} {row['window_late']:>6.3f} "
                 f"{row['sink_window_late']:>6.3f} {row['best_estimate_late']:>7.3f} {row['oracle_late']:>6.3f}"
                 f"   {'':>9} {row['recall']:>5.3f}")
    return text


def kind_list(text):
    """--selection-recall: comma-separated controls and analysis kinds."""
    kinds = text.split(",")
    unknown = [kind for kind in kinds if kind not in CONTROLS and kind not in ANALYSIS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown)}: choose from {', '.join([*CONTROLS, *ANALYSIS])}")
    return kinds


def parse_args(argv):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a checkpoint written by train.py")
    source.add_argument("--init-from", help="a pretrained model: smollm2-135m (fetched once), a llama GGUF file, "
                                            "a Hugging Face directory (OPT or llama) or hub name")
    source.add_argument("--curves", nargs="+", metavar="HISTORY",
                        help="history.jsonl files written by train.py: draw recall against tokens "
                             "into --plot")
    p.add_argument("--labels", help="comma-separated names of the --curves runs (default: their folders)")
    p.add_argument("--json", help="also write the raw figures to this JSON file (an evaluation's ppl, tokens, "
                                  "windows, block_size, ratio and recall)")
    p.add_argument("--max-windows", type=positive_int, help="evaluate the split's first N windows only")
    p.add_argument("--teacher", help="a dense teacher: adds the perplexity ratio and, for SEA, "
                                     "mask statistics (kept keys, recall vs oracle)")
    p.add_argument("--plot", help="PNG file: teacher vs SEA estimated attention vs SEA kept keys")
    p.add_argument("--layer", type=int, help="--plot: the layer of the top row (default: the most content-driven "
                                             "head's)")
    p.add_argument("--head", type=non_negative_int, help="--plot: the head of the top row (default as --layer)")
    p.add_argument("--sample", metavar="PROMPT", help="with --ckpt/--init-from: print the prompt's continuation")
    p.add_argument("--max-new-tokens", type=positive_int,
                   help="--sample: tokens to generate (default 100)")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="--sample: softmax temperature")
    p.add_argument("--top-k", type=positive_int, help="--sample: sample among the k most likely tokens (1: greedy)")
    p.add_argument("--seed", type=int, default=1337, help="--sample: the sampling seed; --passkey: the keys' seed")
    p.add_argument("--selection-recall", type=kind_list, metavar="KINDS",
                   help="with a dense model: comma-separated controls and analysis kinds, each choosing keys from the "
                        "model's own q, k (the same for all): recall and output error layer by layer on late rows")
    p.add_argument("--passkey", action="store_true", help="pass-key retrieval: a 5-digit key hidden in filler text "
                                                          "at each depth, asked for at the end (greedy answers)")
    p.add_argument("--passkey-lengths", type=length_list, default=[1024, 2048, 4096, 8192],
                   help="--passkey: prompt lengths in tokens, the answer included (default 1024,2048,4096,8192)")
    p.add_argument("--passkey-depths", type=number_list, default=[0, 0.25, 0.5, 0.75, 1],
                   help="--passkey: where the key sits, 0 (first) to 1 (last) (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--passkey-keys", type=positive_int, default=4, help="--passkey: random keys per length and depth")
    p.add_argument("--reformer-seed", type=int, help="a reformer student: the seed of its rotations at "
                                                     "evaluation (default: the one it was trained with, 0)")
    p.add_argument("--attn", choices=[kind for kind in MASKED_KINDS if kind != "sea"],  # SEA needs its warm-up
                   help="evaluate the model with its attention swapped, training-free (the gates open, so the "
                        "output is the exact softmax over the kept keys): a control (controls.py), or for "
                        "analysis the oracle (each head's top keys) and the perfect estimate (SEA's bins chosen "
                        "by the exact attention)")
    p.add_argument("--k", type=positive_int,
                   help=f"kept keys per query per head, on average over the heads: for --attn (default "
                        f"{SEAConfig.k}), or a new budget for a SEA checkpoint (its estimate does not depend on it)")
    p.add_argument("--t-m", type=positive_int, default=SEAConfig.t_m,
                   help="--attn: T_M, the predictor length: bins per compressed attention row")
    p.add_argument("--sinks", type=non_negative_int, default=SEAConfig.sinks, help="--attn sink-window: first keys kept")
    p.add_argument("--block", type=positive_int, default=SEAConfig.block,
                   help="--attn block-mean, block-bound: keys per block")
    p.add_argument("--sub-bins", type=positive_int, default=SEAConfig.sub_bins,
                   help="--attn sea-heuristic: key blocks per bin of the heuristic estimate (at least)")
    p.add_argument("--finalists", type=positive_int, default=SEAConfig.finalists,
                   help="--attn sea-heuristic: rescore the estimate's top F x budget cells of a row exactly from "
                        "their keys before the final choice (1: none)")
    p.add_argument("--overlap", action="store_true",
                   help="--attn sea-heuristic: a bin's estimate reads every block that holds one of its keys, not "
                        "only those whose middle falls in it (with --finalists: no strong key is credited to the next "
                        "bin alone)")
    p.add_argument("--sink-bin", action="store_true", help="a SEA model: every head keeps the bin of key 0 "
                                                           "(SEAConfig.sink_bin; train.py --sink-bin trains so)")
    p.add_argument("--split", choices=SPLITS, default="test")
    p.add_argument("--block-size", type=positive_int, help="window length (default: the model's block_size)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--data-dir", help="WikiText-2 folder (default $SEA_DATA_DIR, else download)")
    p.add_argument("--cache-dir", help="token and download cache (default $SEA_CACHE_DIR or .cache/)")
    p.add_argument("--device", type=available_device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    return p, p.parse_args(argv)


def run(p, args):
    if args.curves:
        if not args.plot:
            p.error("--curves draws a picture: pass --plot FILE.png")
        labels = args.labels.split(",") if args.labels else None
        if labels and len(labels) != len(args.curves):
            p.error(f"--labels names {len(labels)} runs but --curves has {len(args.curves)}")
        return plot_curves(args.curves, args.plot, labels)

    if args.passkey and not all(0 <= depth <= 1 for depth in args.passkey_depths):
        p.error(f"--passkey-depths {args.passkey_depths}: each depth must lie in [0, 1] (0: the key first, 1: last)")
    model = load_model(args.ckpt or args.init_from, **attention_swap(args)).to(args.device)
    if args.attn:  # training-free: the swapped attention's gates open, its output the softmax over its keys
        model.open_gates()
    if args.sink_bin:  # every layer's SEAAttention reads this config
        if model.config.attn != "sea":
            p.error(f"--sink-bin changes SEA's choice of bins; this model has attn={model.config.attn}")
        model.config.sea.sink_bin = True
    if args.k and not args.attn and not args.selection_recall:  # a new budget for a checkpoint's kept keys
        if model.config.attn not in MASKED_KINDS:
            p.error(f"--k sets how many keys are kept; this model has attn={model.config.attn}")
        model.config.sea.k = args.k
    if args.reformer_seed is not None:  # every layer's LSHAttention reads this config
        model.config.reformer.eval_seed = args.reformer_seed
    if args.passkey:
        return evaluate_passkey(args, model)
    if args.selection_recall:
        return evaluate_selection(args, model)
    if args.sample is not None:
        return sample_text(model, args.sample, args.max_new_tokens or 100, args.temperature, args.top_k,
                           args.seed, args.device)
    return evaluate_model(p, args, model)


def attention_swap(args):
    """--attn and its knobs as config overrides for load_model (none without --attn)."""
    if not args.attn:
        return {}
    return dict(attn=args.attn, sea=swap_config(args))


def swap_config(args):
    """The SEAConfig of --attn's (and --selection-recall's) knobs."""
    return SEAConfig(k=args.k or SEAConfig.k, t_m=args.t_m, sinks=args.sinks, block=args.block, sub_bins=args.sub_bins,
                     finalists=args.finalists, overlap=args.overlap)


def evaluate_model(p, args, model):
    """Test perplexity (and with --teacher the ratio and mask statistics; with --plot the picture)."""
    block_size = args.block_size or model.config.block_size
    if not 2 <= block_size <= model.config.block_size:
        p.error(f"--block-size {block_size} must be between 2 and the model's {model.config.block_size}")
    if args.plot and not args.teacher:
        p.error("--plot needs --teacher (the picture compares SEA with the teacher's attention)")
    if args.plot and model.config.attn != "sea":
        p.error(f"--plot draws SEA's estimate and mask; this model has attn={model.config.attn}")
    if args.plot and not (-model.config.n_layer <= (args.layer or 0) < model.config.n_layer
                          and (args.head or 0) < model.config.n_head):
        p.error(f"--layer {args.layer} / --head {args.head}: the model has {model.config.n_layer} layers "
                f"and {model.config.n_head} heads")
    teacher = load_model(args.teacher).to(args.device) if args.teacher else None
    if teacher is not None and teacher.config.attn != "dense":
        p.error(f"--teacher {args.teacher} has attn={teacher.config.attn}; pass a dense teacher")
    if teacher is not None and teacher.config.tokenizer != model.config.tokenizer:
        p.error(f"--teacher {args.teacher} speaks the tokenizer {teacher.config.tokenizer!r}, the model "
                f"{model.config.tokenizer!r}: pass the teacher the model was distilled from")
    tokens = load_tokens(args.split, args.data_dir, args.cache_dir, model.config.tokenizer)
    row = describe(model, teacher, tokens, block_size, args.batch_size, args.device, args.dtype,
                   max_windows=args.max_windows)
    print(f"{args.split} perplexity {row['ppl']:.2f} on {row['windows']} of {row['of_windows']} windows of "
          f"{block_size} tokens ({row['scored']:,} tokens scored; the split is {row['tokens']:,} tokens), "
          f"attn={model.config.attn}")
    if teacher is not None:
        print(f"{table_header('kept_per_head' in row)}\n{format_row(model.config.attn, row)}")
        if "kept_per_head" in row:
            print(f"(mask statistics on the split's first {RECALL_WINDOWS} windows; late rows: the second half "
                  f"of each)")
    if args.json:
        write_records(row, args.json)
    if args.plot:
        plot_attention(model, teacher, tokens, block_size, args.plot, args.layer, args.head)
    return row['ppl']


# -----------------------------------------------------------------------------
# text generation, and what a generated token costs

def sample_text(model, prompt, max_new_tokens, temperature, top_k, seed, device):
    """Print the prompt and its sampled continuation, and the decoding speed; returns the text."""
    tokenizer = get_tokenizer(model.config.tokenizer)
    ids = tokenizer.encode_ordinary(prompt)
    block_size = model.config.block_size
    if not 1 <= len(ids) < block_size:
        raise ValueError(f"--sample: the prompt has {len(ids)} tokens; it needs 1 to {block_size - 1} "
                         f"(the model's block_size is {block_size})")
    new_tokens = min(max_new_tokens, block_size - len(ids))
    generator = torch.Generator(device=device).manual_seed(seed)
    started = time.perf_counter()
    out = model.generate(torch.tensor([ids], device=device), new_tokens, temperature, top_k, generator)
    seconds = time.perf_counter() - started
    text = tokenizer.decode(out[0, len(ids):].tolist())
    print(prompt + text)
    stop = f" (stopped at the model's block_size, {block_size} tokens)" if new_tokens < max_new_tokens else ""
    print(f"\n[{new_tokens} tokens in {seconds:.1f} s, {new_tokens / seconds:.1f} tokens/s, prompt included, "
          f"attn={model.config.attn}{stop}]")
    return text


# -----------------------------------------------------------------------------
# pass-key retrieval: a number hidden in filler text, asked for at the end (llama.cpp's examples/passkey test)

PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
ANSWER_TOKENS = 8  # generated after the question: a 5-digit key is 5 tokens in SmolLM2's vocabulary, 1 or 2 in gpt2's


class PasskeyPrompt(NamedTuple):
    ids: list  # the prompt's token ids
    key: int
    needle_at: int  # the position of the needle's first token


def passkey_prompt(tokenizer, length, depth, key):
    """The task, filler sentences with the needle before filler number round(depth (fillers - 1)) (llama.cpp's
    places: depth 1 is before the last filler, never right before the question), the question: the most filler
    that keeps the prompt within length - ANSWER_TOKENS tokens (room for the answer)."""
    if not 0 <= depth <= 1:
        raise ValueError(f"--passkey-depths: {depth} is outside [0, 1] (0 puts the key first, 1 last)")
    needle = PASSKEY_NEEDLE.format(key=key)
    count = lambda pieces: len(tokenizer.encode_ordinary(" ".join(pieces)))
    per_filler = count(["", PASSKEY_FILLER])  # a filler sentence and the space before it
    fillers = max(0, (length - ANSWER_TOKENS - count([PASSKEY_TASK, needle, PASSKEY_QUESTION])) // per_filler)
    while True:  # the estimate may be a token or two long: drop fillers until it fits
        before = round(depth * max(0, fillers - 1))  # as llama.cpp places it: before one of the fillers, or alone
        pieces = [PASSKEY_TASK, *[PASSKEY_FILLER] * before, needle, *[PASSKEY_FILLER] * (fillers - before),
                  PASSKEY_QUESTION]
        ids = tokenizer.encode_ordinary(" ".join(pieces))
        if len(ids) <= length - ANSWER_TOKENS or fillers == 0:
            return PasskeyPrompt(ids, key, count(pieces[:1 + before]))
        fillers -= 1


def answer_margin(logits, token):
    """How sure the first step of an answer was: the logit of `token` (the first of the right answer) over the
    largest other, from logits (vocab,). Greedy decoding starts the answer right exactly when it is > 0; a pass
    by a fraction of a logit is one that any small change to the attention can turn."""
    others = logits.float().clone()
    others[token] = float("-inf")
    return float(logits[token] - others.max())


def passkey_passed(answer, key):
    """A pass: the first number in the generated text is the key."""
    number = re.search(r"\d+", answer)
    return number is not None and number.group() == str(key)


@torch.no_grad()
def passkey_retrieval(model, lengths, depths, keys_per_cell, seed, device):
    """Greedy cached generation after each prompt: `keys_per_cell` random 5-digit keys for every length and
    depth (the same keys for every model, given the seed). Returns one record a prompt."""
    tokenizer, rng = get_tokenizer(model.config.tokenizer), random.Random(seed)
    for length in lengths:
        if not 64 <= length <= model.config.block_size:
            raise ValueError(f"--passkey-lengths: {length} tokens is outside 64 .. the model's context "
                             f"({model.config.block_size} tokens)")
    model.eval()
    records, started = [], time.time()
    for length in lengths:
        for depth in depths:
            for _ in range(keys_per_cell):
                prompt = passkey_prompt(tokenizer, length, depth, rng.randint(10000, 99999))
                tokens, logits = zip(*model.decode_steps(torch.tensor([prompt.ids], device=device), ANSWER_TOKENS,
                                                         top_k=1))  # each step's (1, 1) token and (1, vocab) logits
                answer = tokenizer.decode(torch.cat(tokens, dim=1)[0].tolist())
                margin = answer_margin(logits[0][0], tokenizer.encode_ordinary(f" {prompt.key}")[0])
                records.append(dict(length=length, depth=depth, key=prompt.key, tokens=len(prompt.ids),
                                    answer=answer, passed=passkey_passed(answer, prompt.key), margin=round(margin, 3)))
                print(f"  length {length}, depth {depth:.2f}: key {prompt.key}, answered {answer.strip()!r} "
                      f"({'pass' if records[-1]['passed'] else 'miss'}; margin {margin:+.2f}), "
                      f"{time.time() - started:.0f}s", flush=True)
    return records


def passkey_table(records):
    """Passes by length (rows) and depth (columns), as text."""
    lengths, depths = sorted({r["length"] for r in records}), sorted({r["depth"] for r in records})
    cell = lambda length, depth: [r["passed"] for r in records if r["length"] == length and r["depth"] == depth]
    lines = [f"{'length':>8} " + " ".join(f"{f'depth {d:g}':>10}" for d in depths) + f" {'all':>8}"]
    for length in lengths:
        cells = [cell(length, d) for d in depths]
        row = sum(map(sum, cells)), sum(map(len, cells))
        lines.append(f"{length:>8} " + " ".join(f"{f'{sum(c)}/{len(c)}':>10}" for c in cells) + f" {f'{row[0]}/{row[1]}':>8}")
    return "\n".join(lines)


def plot_passkey(records, path, title):
    """The share of keys retrieved by length (rows) and depth (columns)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lengths, depths = sorted({r["length"] for r in records}), sorted({r["depth"] for r in records})
    share = [[statistics.fmean(r["passed"] for r in records if r["length"] == n and r["depth"] == d) for d in depths]
             for n in lengths]
    fig, ax = plt.subplots(figsize=(1.2 * len(depths) + 2, 0.6 * len(lengths) + 1.5))
    ax.imshow(share, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set(xticks=range(len(depths)), xticklabels=[f"{d:g}" for d in depths], xlabel="depth of the key",
           yticks=range(len(lengths)), yticklabels=lengths, ylabel="prompt tokens", title=title)
    save_figure(fig, path)


def evaluate_passkey(args, model):
    """--passkey: the table of passes, and with --json the records, with --plot the picture."""
    records = passkey_retrieval(model, args.passkey_lengths, args.passkey_depths, args.passkey_keys, args.seed,
                                args.device)
    name = model.config.attn if model.config.attn == "dense" else f"{model.config.attn}, k = {model.config.sea.k}"
    passed = sum(r["passed"] for r in records)
    print(f"pass-key retrieval, attn={name}: {passed} of {len(records)}\n{passkey_table(records)}")
    if args.json:
        write_records(dict(attn=model.config.attn, k=model.config.sea.k, t_m=model.config.sea.t_m, records=records),
                      args.json)
    if args.plot:
        plot_passkey(records, args.plot, f"pass key, {name}")
    return passed


def main(argv=None):
    p, args = parse_args(sys.argv[1:] if argv is None else argv)
    return exit_on_bad_input(lambda: run(p, args))


if __name__ == "__main__":
    main()
