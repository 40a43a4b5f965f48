"""
Train on WikiText-2: a dense teacher (from scratch or fine-tuned), or a SEA / Performer / window
student distilled from a teacher; with no arguments, the demo on SmolLM2-135M.

    python train.py                                            # the demo (SmolLM2, 14 to 15 min on 2 cores)
    python train.py --method dense --preset tiny               # tiny teacher from scratch
    python train.py --method sea --teacher out/dense-tiny/ckpt.pt --k 8 --t-m 64
    python train.py --method dense --init-from facebook/opt-125m --block-size 2048
    torchrun --standalone --nproc_per_node=2 train.py --method dense --preset tiny

Data: WikiText-2 from --data-dir (or $SEA_DATA_DIR) in either published layout
(wiki.{split}.raw or wiki.{split}.tokens); without one the raw variant is downloaded
(data.py). Checkpoints go to <out-dir>/ckpt.pt, written atomically.
"""

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from itertools import zip_longest
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import eval as evaluate
from cli import (ArgumentParser, autocast_context, available_device, exit_on_bad_input, keep_freed_memory,
                 non_negative_float, non_negative_int, positive_float, positive_int, write_records)
from data import DATA_ENV, check_long_enough, get_batch, load_tokens
from model import (ATTENTION_KINDS, Decoder, DecoderConfig, PRESETS, is_pretrained_source, load_model, read_checkpoint,
                   run_with_attention_hooks)
from reformer import ReformerConfig
from controls import CONTROLS
from sea import (ESTIMATORS, SEAConfig, attention_bin_targets, causal_attention_pieces, causal_mask, estimate_loss,
                 full_precision, grouped_matmul)

# -----------------------------------------------------------------------------
# distributed

def setup_distributed(device_flag):
    """(rank, world_size, device); under torchrun one process per GPU, or gloo on CPU."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device_flag)
    import torch.distributed as dist
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device_flag.startswith("cuda"):
        dist.init_process_group(backend="nccl")
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    dist.init_process_group(backend="gloo")
    return rank, world, torch.device("cpu")


# -----------------------------------------------------------------------------
# models and optimizer

OFFICIAL_BASELINES = ("performer", "reformer")  # trained with the official code's own recipe by default
GATED_KINDS = ("sea", *CONTROLS)  # sparse attention with SEA's gates (open_gates)


def is_official_baseline(args):
    return args.method in OFFICIAL_BASELINES


def build_student(args):
    """The model to train: fresh, from a checkpoint, or a copy of the teacher with new attention."""
    if args.method == "dense":
        if args.init_from:
            return load_model(args.init_from)
        return Decoder(DecoderConfig.preset(args.preset, dropout=args.dropout))
    reformer = ReformerConfig(bucket_size=args.k, n_hashes=args.n_hashes, official_chunks=args.official_chunks)
    return load_model(args.teacher, attn=args.method, sea=sea_config(args), reformer=reformer)


def sea_config(args):
    return SEAConfig(k=args.k, t_m=args.t_m, nbf=args.nbf, estimator=args.estimator, sink_bin=args.sink_bin,
                     block=args.block, sub_bins=args.sub_bins)


def recipe(args):
    """One line saying how a student is trained (the official baselines have their own recipe)."""
    loss = "0.1 LM + 5 hidden + 0.2 KL" + (" + per-layer attention terms" if args.attention_terms else "")
    knobs = {"reformer": f"buckets of {args.k}, {args.n_hashes} hash rounds"
                         + (", official chunks" if args.official_chunks else ""),
             "performer": f"nbf {args.nbf:g}"}.get(args.method, f"k {args.k}, T_M {args.t_m}, nbf {args.nbf:g}")
    official = is_official_baseline(args) and args.copied_lr_scale == 1.0 and not args.attention_terms
    return (f"recipe{' (the official ' + args.method + ' baseline)' if official else ''}: {knobs}; "
            f"new attention parameters x10, copied weights x{args.copied_lr_scale:g}; loss {loss}")


def load_teacher(args):
    if args.method == "dense":
        return None
    teacher = load_model(args.teacher)
    if teacher.config.attn != "dense":
        raise ValueError(f"--teacher {args.teacher} has attn={teacher.config.attn}; distill from a "
                         f"dense teacher")
    return teacher.eval().requires_grad_(False)


def is_new_attention_parameter(name):
    return ".mechanism." in name  # SEA / Performer modules; everything else is copied from the teacher


def is_estimator_parameter(name):
    """SEA's estimator (steps 1-3): the positional table P, the encoder and the decoder."""
    return any(f".mechanism.{part}" in name for part in ("positions", "encoder.", "decoder."))


def make_optimizer(model, args, only=lambda name: True):
    """AdamW over the parameters whose names pass `only`; 2-D weights decay, biases and norms do
    not. Groups carry an lr_scale: a distilled student trains its new attention parameters at 10x
    the base rate, copied weights at --copied-lr-scale (SEA 0.2x, the official baselines 1x)."""
    groups = {}
    for name, p in model.named_parameters():
        if not (p.requires_grad and only(name)):
            continue
        new = args.method != "dense" and is_new_attention_parameter(name)
        scale = 1.0 if args.method == "dense" else (10.0 if new else args.copied_lr_scale)
        decay = args.weight_decay if p.dim() >= 2 else 0.0
        groups.setdefault((scale, decay), []).append(p)
    param_groups = [dict(params=ps, lr_scale=scale, weight_decay=decay) for (scale, decay), ps in groups.items()]
    return torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95), fused=True)  # fused: a step in one pass


# -----------------------------------------------------------------------------
# the training objective: next-token loss, or distillation from a frozen teacher

def dense_map_terms(q, k, target, rows, kl_weight, squares_weight):
    """kl_weight KL(target || softmax(q k^T)) + squares_weight (softmax(q k^T) - target)^2, summed over the query
    rows q (B, H, R, D) at positions `rows`, target the teacher's causal attention (B, H, R, T), k (B, H_kv, T,
    D); and its gradient with respect to q and k, written out: the loss is a sum of f(p_j) over each row's
    probabilities p = softmax(s), so its gradient to the score s_j is p_j (f'(p_j) - sum_x p_x f'(p_x)).
    The student's log-probabilities are a log_softmax under a finite causal fill (no infinities)."""
    B, H_kv, T, D = k.shape
    scores = grouped_matmul(q, k.transpose(-2, -1)).float()
    scores.masked_fill_(~causal_mask(rows, T), torch.finfo(scores.dtype).min)
    log_p, p = scores.log_softmax(-1), scores.softmax(-1)  # p is 0 past the causal edge, as the target
    error = p - target
    flat = lambda x: x.reshape(-1)  # the sums over every entry as dot products: no product tensor kept
    loss = (kl_weight * (torch.xlogy(target, target).sum() - torch.dot(flat(target), flat(log_p)))
            + squares_weight * torch.dot(flat(error), flat(error)))
    # f'(p) = -kl_weight t / p + 2 squares_weight (p - t); a row of the target sums to target_mass
    target_mass = target.sum(-1, keepdim=True)
    error_mass = (p.unsqueeze(-2) @ error.unsqueeze(-1)).squeeze(-1)  # sum_x p_x (p_x - t_x) of each row
    grad_scores = (error - error_mass).mul_(p).mul_(2 * squares_weight)
    grad_scores.add_(torch.addcmul(target, p, target_mass, value=-1), alpha=-kl_weight)  # + kl_weight (p m - t)
    grad_scores = grad_scores.to(q.dtype)
    grad_q = grouped_matmul(grad_scores, k)  # (B, H, R, D)
    grad_k = grad_scores.reshape(B, H_kv, -1, T).transpose(-2, -1) @ q.reshape(B, H_kv, -1, D)  # a group's heads summed
    return loss, grad_q, grad_k


class DenseMapLoss(torch.autograd.Function):
    """The dense attention term of SEA's loss: the student's own dense attention softmax(q k^T), q (B, H,
    T, D), k (B, H_kv, T, D), against the teacher's, given as its causal pieces (rows, probs)
    (sea.causal_attention_pieces): 0.1 KL per row + MSE over the T x T entries. Built a piece of rows at
    a time over the keys the piece can see (about half the work of whole maps), with the gradient taken
    during the forward pass: only the gradients with respect to q and k are kept, so no student map
    outlives its piece."""

    @staticmethod
    def forward(ctx, q, k, teacher_pieces):
        B, H, T, _ = q.shape
        grad_q, grad_k = torch.zeros_like(q), torch.zeros_like(k)
        total = 0.0
        for rows, target in teacher_pieces:
            last = target.size(-1)  # the rows first .. last - 1 see the keys 0 .. last - 1
            first = last - target.size(2)
            loss, piece_q, piece_k = dense_map_terms(q[:, :, first:last].detach(), k[:, :, :last].detach(), target,
                                                     rows, 0.1 / (B * H * T), 1 / (B * H * T * T))
            grad_q[:, :, first:last] += piece_q
            grad_k[:, :, :last] += piece_k
            total += loss
        ctx.save_for_backward(grad_q, grad_k)
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        grad_q, grad_k = ctx.saved_tensors
        return grad_loss * grad_q, grad_loss * grad_k, None


class TeacherPass:
    """The frozen teacher's outputs on a batch x, ((logits, hidden states, _), layers): each layer's attention
    inputs and output too when need_layers. The last batch's are kept, so that students distilled side by
    side on the same batches (train_side_by_side) share one teacher pass a step; with keep_maps, each layer's
    map too (its causal pieces, "pieces"), which the students would otherwise each rebuild from q and k."""

    def __init__(self, teacher, need_layers, keep_maps=False):
        self.teacher, self.need_layers, self.keep_maps, self.last = teacher, need_layers, keep_maps, None

    @torch.no_grad()
    def __call__(self, x):
        if self.last is None or not torch.equal(self.last[0], x):
            self.last = None  # the previous batch's outputs go before the next are made
            outputs, layers = run_with_attention_hooks(self.teacher, x, self.need_layers)
            for layer in layers if self.keep_maps else []:
                layer["pieces"] = list(causal_attention_pieces(layer["q"], layer["k"]))
            self.last = x, (outputs, layers)
        return self.last[1]


class Objective(nn.Module):
    """forward(x, y) -> (loss, terms). Without a teacher: cross-entropy. With one, the SEA paper's
    distillation loss: 0.1 LM + 5 hidden MSE + 0.2 logits KL, plus the per-layer attention terms
    when attention_terms (SEA's recipe; the official baselines train without them). teacher_pass:
    another student's TeacherPass of the same teacher, to share its passes (else one of its own)."""

    def __init__(self, student, teacher=None, attention_terms=True, teacher_pass=None):
        super().__init__()
        self.student, self.teacher, self.attention_terms = student, teacher, attention_terms
        self.teacher_pass = teacher_pass or (TeacherPass(teacher, attention_terms) if teacher is not None else None)
        if attention_terms and self.teacher_pass and not self.teacher_pass.need_layers:
            raise ValueError("a student trained with the attention terms cannot share a teacher pass made without "
                             "the teacher's layers")

    def forward(self, x, y):
        if self.teacher is None:
            loss = self.student(x, y)[1]
            return loss, {"lm": loss}
        (t_logits, t_hidden, _), t_layers = self.teacher_pass(x)
        s_logits, s_hidden, s_layers = self.student.forward_internals(x, need_layers=self.attention_terms)
        lm, kl = vocabulary_terms(s_logits, t_logits, y)
        terms = {
            "lm": lm,
            "hidden": mean([F.mse_loss(s.float(), t.float()) for s, t in zip(s_hidden, t_hidden)]),
            "kl": kl,
        }
        loss = 0.1 * terms["lm"] + 5 * terms["hidden"] + 0.2 * terms["kl"]
        per_layer = [self.layer_terms(s, t) for s, t in zip(s_layers, t_layers)]
        for name in per_layer[0] if per_layer else []:
            terms[name] = mean([layer[name] for layer in per_layer])
            loss = loss + terms[name]
        return loss, terms

    @staticmethod
    def layer_terms(student, teacher):
        """One layer's attention terms: student's internals (q, k, context, and SEA's scores) against the
        teacher's (q, k, context), whose map is rebuilt from its q and k once, in causal pieces of rows
        (half a T x T map, one layer's at a time), for both map terms; or read as a shared TeacherPass kept it."""
        terms = {}
        teacher_pieces = teacher.get("pieces") or list(causal_attention_pieces(teacher["q"], teacher["k"]))
        if "scores" in student:  # SEA's estimated map vs the teacher's attention
            target = attention_bin_targets(teacher_pieces, student["scores"].size(-1))
            terms["estimate"] = estimate_loss(student["scores"], target)
        terms["dense"] = DenseMapLoss.apply(student["q"], student["k"], teacher_pieces)
        terms["context"] = F.mse_loss(student["context"].float(), teacher["context"].float())
        return terms


def vocabulary_terms(s_logits, t_logits, y):
    """Next-token cross-entropy and KL(teacher || student) over the vocabulary, per token.
    The teacher's side needs no gradient: its probabilities and entropy are computed once."""
    s_logp = F.log_softmax(full_precision(s_logits.flatten(0, 1)), -1)  # (N, V)
    with torch.no_grad():
        t_logp = F.log_softmax(full_precision(t_logits.flatten(0, 1)), -1)
        t_p = t_logp.exp()
        negative_entropy = torch.vdot(t_p.flatten(), t_logp.flatten())
    kl = (negative_entropy - torch.vdot(t_p.flatten(), s_logp.flatten())) / len(s_logp)
    return F.nll_loss(s_logp, y.flatten()), kl


def mean(values):
    return sum(values) / len(values)


def lr_at(it, args):
    """Linear warm-up, then cosine decay to min_lr."""
    if it < args.warmup_iters:
        return args.lr * (it + 1) / args.warmup_iters
    progress = min(1.0, (it - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


@torch.no_grad()
def estimate_val_loss(model, tokens, args, device):
    model.eval()
    generator = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(args.eval_iters):
        x, y = get_batch(tokens, args.batch_size, args.block_size, generator, device)
        with autocast_context(device, args.dtype):
            losses.append(model(x, y)[1].item())
    model.train()
    return sum(losses) / len(losses)


def peak_memory(device):
    if device.type != "cuda":
        return ""
    return f" | peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"


def save_checkpoint(path, model, optimizer, it, best_val, args):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(model=model.state_dict(), config=model.config.to_dict(),
                    optimizer=optimizer.state_dict(), iter=it, best_val=best_val,
                    args=vars(args)), path.with_suffix(".part"))
    path.with_suffix(".part").rename(path)


# -----------------------------------------------------------------------------
# SEA's estimator: a warm-up of its own, and its recall in the log

def warm_up_estimator(student, teacher, train_tokens, val_tokens, args, device, master=True, history=None):
    """Phase 1 (--estimator-iters N): train only SEA's estimator (P, encoder, decoder of every
    layer) on the estimate loss, from the frozen teacher's own q, k, v and attention, one window
    at a time (estimator_step). No student forward pass and no output layer, so a step costs a
    fraction of a distillation step. AdamW at --estimator-lr, a linear warm-up over the first
    tenth of the steps, then cosine decay to a tenth. With --estimator-overfit every step trains on
    the validation windows the recall is measured on (the over-fit test)."""
    mechanisms = [block.self_attn.mechanism for block in student.layers]
    optimizer = make_optimizer(student, args, only=is_estimator_parameter)
    schedule = argparse.Namespace(lr=args.estimator_lr, min_lr=args.estimator_lr / 10, max_iters=args.estimator_iters,
                                  warmup_iters=args.estimator_iters // 10)
    generator = torch.Generator().manual_seed(args.seed + 1)
    T = args.block_size
    fixed = None
    if args.estimator_overfit:  # the over-fit test trains on the very windows its recall is measured on
        fixed = evaluate.sample_windows(val_tokens, T, evaluate.RECALL_WINDOWS).to(device)
    if master:  # where the curve starts: the estimator untrained
        record(history, phase="estimator", step=0, tokens=0, **report_recall(student, teacher, val_tokens, args,
                                                                            "estimator 0"))
    student.train()
    started = time.time()
    for it in range(1, args.estimator_iters + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it - 1, schedule)
        x = fixed if fixed is not None else get_batch(train_tokens, args.batch_size, T, generator, device)[0]
        with autocast_context(device, args.dtype):
            loss = estimator_step(mechanisms, teacher, x)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens = it * args.batch_size * T
        if master and (it % args.log_interval == 0 or it == args.estimator_iters):
            elapsed = time.time() - started
            print(f"estimator {it}/{args.estimator_iters} | estimate loss {loss:.4f} | "
                  f"{tokens / elapsed:,.0f} tok/s | {elapsed:.0f}s", flush=True)
            record(history, phase="estimator-loss", step=it, tokens=tokens, estimate_loss=loss,
                   seconds=round(elapsed, 1))
        if master and (it % args.eval_interval == 0 or it == args.estimator_iters):
            stats = report_recall(student, teacher, val_tokens, args, f"estimator {it}")
            record(history, phase="estimator", step=it, tokens=tokens, **stats)


def estimator_step(mechanisms, teacher, x):
    """One window's estimate loss, averaged over the layers, its gradients added to the estimators':
    the teacher runs one plain forward pass (no T x T maps kept), then each layer in turn builds its
    teacher map, reduces it to the mass per bin (bin_targets), drops it and runs its own backward
    pass, so only one layer's map and graph are alive at a time. Returns the loss (a float)."""
    with torch.no_grad():
        _, inputs = run_with_attention_hooks(teacher, x, need_hidden=False, logits=None)
    total = 0.0
    for mechanism, layer in zip(mechanisms, inputs):
        with torch.no_grad():
            target = attention_bin_targets(causal_attention_pieces(layer["q"], layer["k"]), mechanism.cfg.t_m)
        loss = estimate_loss(mechanism.estimate(layer["q"], layer["k"], layer["v"]), target) / len(inputs)
        loss.backward()
        total += loss.item()
    return total


def report_recall(student, teacher, val_tokens, args, when):
    """For students that keep a subset of keys: mask recall on the first validation windows,
    printed and returned (an empty dict for other students, or with --no-recall)."""
    if not args.recall or student.config.attn not in evaluate.MASKED_KINDS:
        return {}
    stats = evaluate.mask_statistics(student, evaluate.TeacherAttention(teacher, val_tokens, args.block_size))
    print(f"{when}: {evaluate.format_mask_statistics(stats)}  (first {evaluate.RECALL_WINDOWS} validation "
          f"windows)", flush=True)
    student.train()
    return stats


def record(history, **entry):
    """Append one validation's figures to the run's history (JSON lines; eval.py --curves draws them)."""
    if history is not None:
        with open(history, "a") as f:
            f.write(json.dumps(entry) + "\n")


# -----------------------------------------------------------------------------
# the training run, phase by phase

class Run(NamedTuple):
    """What every phase of a run shares: the process's place, the model and its objective, where it starts."""
    rank: int
    world: int
    device: torch.device
    model: Decoder
    objective: Objective
    optimizer: torch.optim.Optimizer
    resumed: bool
    start_iter: int  # 0, or the resumed checkpoint's iteration
    best_val: float
    ckpt_path: Path
    history: Optional[Path]  # the master's history.jsonl, None on the other ranks

    @property
    def master(self):
        return self.rank == 0


def train(args):
    """Train as the flags say: a teacher, or a student's warm-up, then distillation; returns the checkpoint's
    path (None after the over-fit test)."""
    run = start_run(args)
    train_tokens, val_tokens = (load_text(split, args, run.model) for split in ("train", "valid"))
    if args.estimator_iters and not run.resumed:  # phase 1, before DDP copies rank 0's weights
        warm_up_estimator(run.model, run.objective.teacher, train_tokens, val_tokens, args, run.device, run.master,
                          run.history)
        if args.estimator_overfit:
            if run.master:
                print(f"over-fit test done (no distillation, no checkpoint); its recall is in {run.history}")
            return finish(run, None)
    if args.training_free:  # the warm-up was all: the teacher's weights, SEA's estimate, exact sparse softmax
        if run.master:
            save_checkpoint(run.ckpt_path, run.model, run.optimizer, 0, float("nan"), args)
            print(f"training-free SEA (estimator warm-up only, gates open): saved {run.ckpt_path}")
        return finish(run, run.ckpt_path)
    optimize(run, train_tokens, val_tokens, args)
    return finish(run, run.ckpt_path)


def start_run(args, teacher_pass=None):
    """The process's place, the model (fresh, a student of the teacher, or resumed from its checkpoint), the
    teacher (teacher_pass's, to share its passes, else loaded) and the objective, the optimizer, and a fresh
    history unless resumed."""
    rank, world, device = setup_distributed(args.device)
    torch.manual_seed(args.seed + rank)
    ckpt_path = Path(args.out_dir) / "ckpt.pt"
    checkpoint = read_resumed_checkpoint(ckpt_path, args) if args.resume else None
    model = Decoder.from_checkpoint_dict(checkpoint, str(ckpt_path)) if checkpoint else build_student(args)
    teacher = teacher_pass.teacher if teacher_pass else load_teacher(args)
    args.block_size = args.block_size or model.config.block_size
    if args.block_size > model.config.block_size:
        raise ValueError(f"--block-size {args.block_size} exceeds the model's "
                         f"{model.config.block_size} learned positions")
    model.to(device)
    objective = Objective(model, teacher.to(device) if teacher is not None else None,
                          attention_terms=args.method != "dense" and args.attention_terms, teacher_pass=teacher_pass)
    optimizer = make_optimizer(model, args)
    start_iter, best_val = 0, float("inf")
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_iter, best_val = checkpoint["iter"], checkpoint["best_val"]
        if rank == 0:
            print(f"resumed from {ckpt_path} at iteration {start_iter}")
    history = Path(args.out_dir) / "history.jsonl" if rank == 0 else None
    if rank == 0 and checkpoint is None:  # a fresh run starts a fresh history
        history.parent.mkdir(parents=True, exist_ok=True)
        history.write_text("")
    if (args.open_gates or args.training_free) and checkpoint is None:
        model.open_gates()  # the student starts as the exact softmax over its kept keys (the warm-up's recall is
        # measured so too; it trains no gate)
    return Run(rank, world, device, model, objective, optimizer, checkpoint is not None, start_iter, best_val,
               ckpt_path, history)


def read_resumed_checkpoint(ckpt_path, args):
    """--resume: the run's checkpoint, which must exist and leave iterations to train."""
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path} (check --out-dir)")
    checkpoint = read_checkpoint(ckpt_path)
    if checkpoint["iter"] >= args.max_iters:
        raise ValueError(f"--resume: {ckpt_path} is at iteration {checkpoint['iter']}, so "
                         f"--max-iters {args.max_iters} leaves nothing to train; raise --max-iters")
    return checkpoint


def load_text(split, args, model):
    """A split's tokens in the model's tokenizer, long enough for one window."""
    tokens = load_tokens(split, args.data_dir, args.cache_dir, model.config.tokenizer)
    check_long_enough(tokens, args.block_size + 2, f"{split} split")
    return tokens


def finish(run, result):
    if run.world > 1:
        torch.distributed.destroy_process_group()
    return result


def train_side_by_side(all_args):
    """Distil several students of one teacher (the flags of each in all_args; no warm-up, one process) a step
    of each in turn: on the same windows (the same --seed) the teacher's pass of a window is made once for
    all of them (TeacherPass), with the same numbers as each run alone. Returns each student, trained, with the
    path of its checkpoint: [(model, path)]."""
    if any(args.method == "dense" or args.estimator_iters or args.training_free or args.resume for args in all_args):
        raise ValueError("train_side_by_side distils fresh students only (no dense run, warm-up or --resume)")
    runs, teacher_pass = [], None
    for args in all_args:
        runs.append(start_run(args, teacher_pass))
        teacher_pass = runs[-1].objective.teacher_pass
        teacher_pass.keep_maps = teacher_pass.need_layers  # the teacher's maps, built once for all the students
    steps = [optimizing(run, *(load_text(split, args, run.model) for split in ("train", "valid")), args)
             for run, args in zip(runs, all_args)]
    for _ in zip_longest(*steps):  # each generator takes one step
        pass
    return [(run.model, finish(run, run.ckpt_path)) for run in runs]


def optimize(run, train_tokens, val_tokens, args):
    """The main phase: next-token training (a teacher) or distillation (a student), with validation,
    checkpoints and the kept keys' recall every --eval-interval steps."""
    for _ in optimizing(run, train_tokens, val_tokens, args):
        pass


def optimizing(run, train_tokens, val_tokens, args):
    """optimize as a generator that yields after each step (train_side_by_side interleaves several)."""
    model, optimizer = run.model, run.optimizer
    objective = run.objective
    if run.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        objective = DistributedDataParallel(objective, device_ids=[run.device.index] if run.device.type == "cuda"
                                            else None)
    scaler = torch.amp.GradScaler(run.device.type, enabled=args.dtype == "float16")
    generator = torch.Generator().manual_seed(args.seed + run.rank)
    for _ in range(run.start_iter * args.grad_accum):  # a resumed run goes on with the windows it would have drawn
        get_batch(train_tokens, args.batch_size, args.block_size, generator, "cpu")
    tokens_per_iter = args.batch_size * args.block_size * args.grad_accum * run.world
    if run.master:
        print(f"{args.method}: {model.num_params() / 1e6:.1f}M parameters, attn={model.config.attn}, "
              f"{tokens_per_iter:,} tokens per iteration on {run.world} x {run.device} ({args.dtype})")
        if args.method != "dense":
            print(recipe(args))
    best_val = run.best_val
    if run.master and not run.resumed and args.method != "dense":  # a student's curve starts where it stands untrained
        best_val = validate(0, best_val, val_tokens, tokens_per_iter, run, args)
    model.train()
    clock = dict(started=time.time(), steps=0, stepping=0.0)  # since the last line: steps, and seconds in them
    for it in range(run.start_iter, args.max_iters):
        step_started = time.time()
        loss, terms = optimizer_step(objective, optimizer, scaler, train_tokens, generator, it, run, args)
        clock["steps"], clock["stepping"] = clock["steps"] + 1, clock["stepping"] + time.time() - step_started
        done = it + 1
        if run.master and (done % args.log_interval == 0 or done == args.max_iters):
            log_step(done, loss, terms, lr_at(it, args), tokens_per_iter, clock, run, args)
        if run.master and (done % args.eval_interval == 0 or done == args.max_iters):
            best_val = validate(done, best_val, val_tokens, tokens_per_iter, run, args)
        yield done


def optimizer_step(objective, optimizer, scaler, train_tokens, generator, it, run, args):
    """One step of the optimizer over --grad-accum micro-batches; returns the last one's loss and terms."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(it, args) * group["lr_scale"]
    for micro in range(args.grad_accum):
        x, y = get_batch(train_tokens, args.batch_size, args.block_size, generator, run.device)
        sync = micro == args.grad_accum - 1 or run.world == 1
        with (nullcontext() if sync else objective.no_sync()), autocast_context(run.device, args.dtype):
            loss, terms = objective(x, y)
        scaler.scale(loss / args.grad_accum).backward()
    if args.grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss, terms


def log_step(done, loss, terms, lr, tokens_per_iter, clock, run, args):
    """One line: the loss and its terms, the learning rate, tokens/s over this run's own steps since its last line
    (side by side, not counting the other students' steps) and the time since the run's first step."""
    shown = " ".join(f"{name} {value.item():.4f}" for name, value in terms.items())
    print(f"{args.method} iter {done}/{args.max_iters} | loss {loss.item():.4f} ({shown}) | "
          f"lr {lr:.2e} | {clock['steps'] * tokens_per_iter / clock['stepping']:,.0f} tok/s | "
          f"{time.time() - clock['started']:.0f}s{peak_memory(run.device)}", flush=True)
    clock["steps"], clock["stepping"] = 0, 0.0


def validate(done, best_val, val_tokens, tokens_per_iter, run, args):
    """The validation loss, a checkpoint (after step 0) and the kept keys' recall; returns the best validation loss
    so far."""
    val = estimate_val_loss(run.model, val_tokens, args, run.device)
    if not math.isfinite(val):  # a diverged run never overwrites a good checkpoint
        raise ValueError(f"validation loss is {val} at iteration {done}: training diverged "
                         f"(try a lower --lr); {run.ckpt_path} was left as it was")
    best_val = min(best_val, val)
    saved = ""
    if done:  # at step 0 nothing is trained yet: no checkpoint (1.7 GB for SmolLM2 with the optimizer's state)
        save_checkpoint(run.ckpt_path, run.model, run.optimizer, done, best_val, args)
        saved = f", saved {run.ckpt_path}"
    print(f"{args.method} iter {done}: val loss {val:.4f} (ppl {math.exp(val):.1f}){saved}", flush=True)
    stats = report_recall(run.model, run.objective.teacher, val_tokens, args, f"iter {done}")
    record(run.history, phase=args.method, step=done, tokens=done * tokens_per_iter, val_loss=val, **stats)
    return best_val


# -----------------------------------------------------------------------------
# the command line: every flag in one table, with its default, where it applies and its help

class Where(NamedTuple):
    """Where a flag applies: a test on the flags, and the same in words for the error when it does not."""
    holds: Callable
    words: str


class Rule(NamedTuple):
    """A default that depends on other flags: computed from them (those above it in FLAGS), said in words."""
    of: Callable
    words: str


STUDENT = Where(lambda a: a.method != "dense", "the students (--method other than dense)")
DENSE = Where(lambda a: a.method == "dense", "--method dense")
SCRATCH = Where(lambda a: a.method == "dense" and not a.init_from, "a dense model trained from scratch "
                                                                    "(--method dense without --init-from)")
SEA_ONLY = Where(lambda a: a.method == "sea", "--method sea")
WARM_UP = Where(lambda a: a.method == "sea" and a.estimator_iters > 0, "--method sea with --estimator-iters N")
HEURISTIC = Where(lambda a: a.method == "sea-heuristic" or (a.method == "sea" and a.estimator == "residual"),
                  "--method sea-heuristic, or sea with --estimator residual")
BLOCKS = Where(lambda a: a.method in ("block-mean", "block-bound"), "--method block-mean or block-bound")
REFORMER = Where(lambda a: a.method == "reformer", "--method reformer")
GATED = Where(lambda a: a.method in GATED_KINDS, f"--method {', '.join(GATED_KINDS)}")
EVERYWHERE = None


def default_lr(args):
    return 1e-4 if args.method != "dense" else 2e-5 if args.init_from else 1e-3


def default_dtype(args):
    if args.device == "cpu":
        return "float32"
    return "bfloat16" if args.device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float16"


def default_out_dir(args):
    source = args.teacher or args.init_from  # a student of a named pretrained model is named after it
    named = source and not Path(source).exists()
    return f"out/{args.method}-{source.replace('/', '-') if named else args.preset}"


FLAGS = (  # (flag, default, where it applies, argparse's options); a rule reads only the flags above it
    # what to train
    ("--method", "dense", EVERYWHERE, dict(
        choices=ATTENTION_KINDS, help="dense: train a teacher; the others distill a student from --teacher (window, "
                                      "sink-window, block-*, sea-heuristic: SEA's controls; performer, reformer: "
                                      "the paper's baselines)")),
    ("--teacher", None, STUDENT, dict(help="is the students' teacher: a train.py checkpoint, a GGUF file, a Hugging "
                                           "Face directory, a hub name, or smollm2-135m (fetched once)")),
    ("--init-from", None, DENSE, dict(help="starts a dense model from a train.py checkpoint, a pretrained model "
                                           "(smollm2-135m, a llama GGUF file), a Hugging Face directory or a hub "
                                           "name (facebook/opt-125m)")),
    ("--preset", "tiny", SCRATCH, dict(help=f"is the shape of a model trained from scratch: {sorted(PRESETS)}")),
    ("--dropout", 0.0, SCRATCH, dict(type=float, help="is the dropout of a model trained from scratch")),
    # the student's attention
    ("--k", SEAConfig.k, STUDENT, dict(type=positive_int, help="sets the keys a query keeps per head: SEA and the "
                                                                "controls on average over the heads; reformer's "
                                                                "bucket size")),
    ("--t-m", SEAConfig.t_m, STUDENT, dict(type=positive_int, help="sets T_M, the bins per row of SEA and the "
                                                                    "controls")),
    ("--nbf", Rule(lambda a: 1.0 if a.method == "performer" else SEAConfig.nbf, "1 for performer, else 8"), STUDENT,
     dict(type=positive_float, help="sets the feature factor of SEA, the controls and performer: m = D ln D / nbf "
                                       "features")),
    ("--n-hashes", ReformerConfig.n_hashes, STUDENT, dict(type=positive_int, help="sets reformer's hash rounds")),
    ("--official-chunks", False, REFORMER, dict(action="store_true", help="uses the official fixed chunks of the "
                                                                         "sorted order (not strictly causal)")),
    ("--estimator", SEAConfig.estimator, SEA_ONLY, dict(
        choices=ESTIMATORS, help="chooses SEA's estimator: the paper's, or ours (residual), a learned residual on "
                                 "a training-free estimate from the keys, which it equals before training")),
    ("--block", SEAConfig.block, BLOCKS, dict(type=positive_int, help="sets the keys per block")),
    ("--sub-bins", SEAConfig.sub_bins, HEURISTIC, dict(type=positive_int, help="sets the heuristic estimate's key "
                                                                                "blocks per bin (at least)")),
    ("--sink-bin", False, SEA_ONLY, dict(action="store_true", help="makes every head of every row keep the bin "
                                                                   "that holds key 0 (beyond the paper), within the "
                                                                   "same budget")),
    ("--open-gates", False, GATED, dict(action="store_true", help="starts the student as the exact softmax over its "
                                                                  "kept keys (the paper starts the gates closed)")),
    # the schedule
    ("--max-iters", Rule(lambda a: 600 if a.method == "dense" else 250, "600 dense, 250 distilling"), EVERYWHERE,
     dict(type=positive_int, help="optimizer steps")),
    ("--lr", Rule(default_lr, "1e-3 from scratch, 2e-5 fine-tuning, 1e-4 distilling"), EVERYWHERE,
     dict(type=positive_float, help="peak base learning rate")),
    ("--min-lr", Rule(lambda a: a.lr / 10, "lr / 10"), EVERYWHERE, dict(type=non_negative_float,
                                                                         help="final learning rate")),
    ("--warmup-iters", Rule(lambda a: a.max_iters // 12, "max-iters / 12"), EVERYWHERE,
     dict(type=non_negative_int, help="steps of linear learning-rate warm-up")),
    ("--weight-decay", 0.1, EVERYWHERE, dict(type=non_negative_float, help="AdamW's, on 2-D weights")),
    ("--grad-clip", 1.0, EVERYWHERE, dict(type=non_negative_float, help="gradient norm clip (0: none)")),
    ("--copied-lr-scale", Rule(lambda a: 1.0 if is_official_baseline(a) else 0.2,
                               "1.0 for performer and reformer, their official recipe; else 0.2"), STUDENT,
     dict(type=non_negative_float, help="scales the learning rate of the weights copied from the teacher")),
    ("--attention-terms", Rule(lambda a: not is_official_baseline(a),
                               "on; off for performer and reformer, as their official code trains them"), STUDENT,
     dict(action=argparse.BooleanOptionalAction, help="adds the per-layer attention terms to the loss")),
    ("--estimator-iters", 0, SEA_ONLY, dict(type=non_negative_int, help="first trains SEA's estimator alone for this "
                                                                         "many steps (0: off)")),
    ("--estimator-lr", Rule(lambda a: 10 * a.lr, "10 x lr"), WARM_UP, dict(type=positive_float,
                                                                           help="is the warm-up's learning rate")),
    ("--training-free", False, WARM_UP, dict(action="store_true", help="saves SEA after its estimator warm-up, gates "
                                                                       "open, with no distillation")),
    ("--estimator-overfit", False, WARM_UP, dict(action="store_true", help="trains the warm-up on the very "
                                                                           "validation windows its recall is "
                                                                           "measured on, then stops (a diagnostic)")),
    # data, batches, validation
    ("--data-dir", None, EVERYWHERE, dict(help=f"WikiText-2 folder (default ${DATA_ENV}, else download)")),
    ("--cache-dir", None, EVERYWHERE, dict(help="token and download cache (default $SEA_CACHE_DIR or .cache/)")),
    ("--block-size", None, EVERYWHERE, dict(type=positive_int, help="training sequence length (default: the "
                                                                    "model's)")),
    ("--batch-size", 8, EVERYWHERE, dict(type=positive_int, help="sequences per micro-batch")),
    ("--grad-accum", 1, EVERYWHERE, dict(type=positive_int, help="micro-batches per optimizer step")),
    ("--eval-interval", Rule(lambda a: -(-a.max_iters // 3), "a third of max-iters, then the end"), EVERYWHERE,
     dict(type=positive_int, help="steps between validations")),
    ("--eval-iters", 20, EVERYWHERE, dict(type=positive_int, help="batches per validation")),
    ("--recall", True, STUDENT, dict(action=argparse.BooleanOptionalAction, help=(
        "measures the kept keys' recall at each validation (4 windows of the teacher's and the student's maps, "
        "half a minute for SmolLM2 at 512 tokens on a CPU)"))),
    ("--log-interval", 10, EVERYWHERE, dict(type=positive_int, help="steps between log lines")),
    # where it runs
    ("--out-dir", Rule(default_out_dir, "out/<method>-<preset>, or out/<method>-<name> for a student of a named "
                                        "pretrained model"), EVERYWHERE, dict(help="where ckpt.pt goes")),
    ("--resume", False, EVERYWHERE, dict(action="store_true", help="continue from <out-dir>/ckpt.pt")),
    ("--device", "cuda" if torch.cuda.is_available() else "cpu", EVERYWHERE,
     dict(type=available_device, help="where to run")),
    ("--dtype", Rule(default_dtype, "float32 on a CPU, where bfloat16 ran 5x slower on SmolLM2; bfloat16 on "
                                    "capable GPUs, else float16"), EVERYWHERE,
     dict(choices=["float32", "bfloat16", "float16"], help="autocast dtype")),
    ("--seed", 1337, EVERYWHERE, dict(type=int, help="random seed")),
)


def dest(flag):
    return flag[2:].replace("-", "_")


def parse_args(argv):
    """The command line -> the flags of a run (settle): every default filled in, every combination checked."""
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default, _, options in FLAGS:
        shown = default.words if isinstance(default, Rule) else default
        help_text = options["help"] + ("" if shown is None or shown is False else f" (default {shown})")
        parser.add_argument(flag, **dict(options, default=None, help=help_text))
    try:
        return settle(**vars(parser.parse_args(argv)))
    except ValueError as e:
        parser.error(str(e))


def settle(**given):
    """The flags given (None: not given; a flag's name with underscores) -> the run's flags, a Namespace: the
    defaults of FLAGS filled in; a flag given where it does not apply, or a bad combination, a ValueError."""
    known = {dest(flag) for flag, *_ in FLAGS}
    if unknown := set(given) - known:
        raise ValueError(f"unknown flags {sorted(unknown)}")
    args = argparse.Namespace(**{name: given.get(name) for name in known})
    for flag, default, _, _ in FLAGS:  # plain defaults first: the rules and the places read them
        if getattr(args, dest(flag)) is None and not isinstance(default, Rule):
            setattr(args, dest(flag), default)
    for flag, default, where, options in FLAGS:
        if given.get(dest(flag)) is not None and where is not None and not where.holds(args):
            raise ValueError(f"{flag} {options['help'].split(':')[0]}; it applies to {where.words} only")
        if getattr(args, dest(flag)) is None and isinstance(default, Rule):
            setattr(args, dest(flag), default.of(args))
    check_combination(args)
    return args


def check_combination(args):
    """What one flag's place cannot say: a student needs a teacher, files must exist, values must fit."""
    if args.method != "dense" and not args.teacher:
        raise ValueError(f"--method {args.method} distills from a teacher: pass --teacher "
                         f"(e.g. out/dense-tiny/ckpt.pt from 'python train.py --method dense')")
    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}: choose one of {sorted(PRESETS)}")
    for flag in ("init_from", "teacher"):
        path = getattr(args, flag)
        if path and not (Path(path).exists() or is_pretrained_source(path)):
            raise ValueError(f"--{flag.replace('_', '-')} {path}: no such file or directory")
    if not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout {args.dropout} must be in [0, 1)")
    sea_config(args)  # SEAConfig's own checks


def as_command(flags):
    """The train.py command line of `flags` (a dict as settle takes)."""
    words = []
    for name, value in flags.items():
        flag = name.replace('_', '-')
        words += [f"--no-{flag}"] if value is False else [f"--{flag}"] + ([] if value is True else [str(value)])
    return "python train.py " + " ".join(words)


# -----------------------------------------------------------------------------
# the demo: python train.py with no arguments

TEST_DATA_ENV = "SEA_TEST_DATA_DIR"  # the demo's test text, when it is not in the training folder
DEMO_SWAPS = ("window", "sink-window", "block-mean", "sea-heuristic", "perfect-estimate", "oracle")  # untrained: only
# the key choice; block-bound, a second block control, is left to eval.py (the README's table has it)
DEMO_STUDENTS = ("sea", "sink-window")  # the demo distils ours and its control


def demo(source="smollm2-135m", block_size=512, k=16, t_m=64, sub_bins=2, distill_steps=20, warm_up_steps=10,
         windows=4, out_dir="out/demo"):
    """SmolLM2-135M, frozen, with only its attention swapped, each way keeping about k keys per query per
    head (3% of a late row at T = 512): the controls and our SEA untrained (sea-heuristic), the analysis
    rows, the paper's estimator after a warm-up; then the paper's recipe: SEA (ours) and the sink-window
    distilled from open gates for `distill_steps` steps on the same training windows. Test perplexity
    of the first `windows` windows and late-row recall, as a table, JSON and pictures."""
    started = time.time()
    step = lambda text: print(f"== {text}  [{time.time() - started:.0f}s]", flush=True)
    knobs = dict(teacher=source, block_size=block_size, k=k, t_m=t_m, batch_size=1)
    paper = dict(method="sea", **knobs, estimator="paper", training_free=True, estimator_iters=warm_up_steps,
                 estimator_lr=3e-3, recall=False, out_dir=f"{out_dir}/sea-paper")  # recall: in its row
    ours = dict(estimator="residual", sub_bins=sub_bins)
    distilled = {method: dict(method=method, **knobs, **(ours if method == "sea" else {}),
                              open_gates=True, max_iters=distill_steps, eval_interval=max(1, distill_steps // 2),
                              eval_iters=1, recall=False, log_interval=1,
                              out_dir=f"{out_dir}/{method}")
                 for method in DEMO_STUDENTS}
    runs = {name: settle(**flags) for name, flags in (("paper", paper), *distilled.items())}  # all checked first
    device = runs["paper"].device
    step(f"1/4 the teacher: {source}")
    teacher = load_model(source).eval()
    tokens = load_tokens("test", os.environ.get(TEST_DATA_ENV), None, teacher.config.tokenizer)
    # the teacher's maps, once for every row of the table
    teacher_attention = evaluate.TeacherAttention(teacher.to(device), tokens, block_size, keep_sorted=True,
                                                  dtype="float32")  # which scores the teacher's windows too
    measure = lambda model, training, teacher_ppl=None, known=(): dict(evaluate.describe(
        model.to(device), teacher if teacher_ppl else None, tokens, block_size, 1, device, "float32",
        teacher_ppl, max_windows=windows, teacher_attention=teacher_attention, known=known), training=training)
    rows = {"dense teacher": dict(measure(teacher, "-", known=teacher_attention.window_nll), ratio=1.0)}
    teacher_ppl = rows["dense teacher"]["ppl"]
    step(f"2/4 training-free swaps of the teacher's attention: {', '.join(DEMO_SWAPS)}")
    for kind in DEMO_SWAPS:
        model = load_model(source, attn=kind, sea=SEAConfig(k=k, t_m=t_m, sub_bins=sub_bins)).open_gates()
        rows[kind] = measure(model, "none", teacher_ppl)
        print(f"{kind}: ppl {rows[kind]['ppl']:.2f} ({rows[kind]['ratio']:.3f}x)", flush=True)
    step(f"3/4 the paper's estimator, trained alone first: {as_command(paper)}")
    rows["sea, paper's"] = measure(Decoder.from_checkpoint(train(runs["paper"])), f"warm-up {warm_up_steps} windows",
                                   teacher_ppl)
    step(f"4/4 distil {' and '.join(DEMO_STUDENTS)} by the paper's loss from open gates, side by side: the same "
         f"windows, one teacher pass a step for both, the numbers of each command alone")
    for method in DEMO_STUDENTS:
        print(f"{method}: {as_command(distilled[method])}")
    trained = train_side_by_side([runs[method] for method in DEMO_STUDENTS])
    students = {method: model for method, (model, _) in zip(DEMO_STUDENTS, trained)}  # as their checkpoints hold them
    for method, student in students.items():
        rows[distilled_name(method, distill_steps)] = measure(student, f"distilled {distill_steps} steps", teacher_ppl)
    print(f"\ntest split, first {windows} windows of {block_size} tokens, k = {k}, T_M = {t_m}, {sub_bins} sub-bins, "
          f"{time.time() - started:.0f}s in all")
    print(evaluate.table_header(training=True))
    for name, row in rows.items():
        print(evaluate.format_row(name, row))
    print(f"recall: the teacher's attention mass on the kept keys, late rows (the second half of each of the "
          f"first {evaluate.RECALL_WINDOWS} windows); the other columns keep as many keys per (head, row): the "
          f"most recent, the first {SEAConfig.sinks} plus the most recent, SEA's bins chosen by the teacher's "
          f"mass, the teacher's own top keys. sea-heuristic is our SEA untrained; sea, paper's is the paper's "
          f"estimator trained alone on {warm_up_steps} windows (the paper trains it within a long distillation): "
          f"how far a learned estimate is from useful after little training.")
    print(distillation_sentence(rows, distill_steps))
    write_records(rows, f"{out_dir}/table.json")
    evaluate.plot_attention(students["sea"], teacher, tokens, block_size, f"{out_dir}/attention.png")
    evaluate.plot_layer_recall(rows, f"{out_dir}/recall-per-layer.png")
    evaluate.plot_validation([f"{out_dir}/{method}/history.jsonl" for method in DEMO_STUDENTS],
                             f"{out_dir}/distillation.png", labels=list(DEMO_STUDENTS))
    return rows


def distilled_name(method, steps):
    return f"{method}, distilled {steps}"


def distillation_sentence(rows, steps):
    """What distillation changed, measured: each student's ratio to the teacher untrained and distilled."""
    sea, sink = (rows[distilled_name(method, steps)]["ratio"] for method in DEMO_STUDENTS)
    return (f"distillation, {steps} steps each: our SEA from {rows['sea-heuristic']['ratio']:.3f}x the teacher's "
            f"perplexity (untrained: the sea-heuristic row) to {sea:.3f}x; the sink-window from "
            f"{rows['sink-window']['ratio']:.3f}x to {sink:.3f}x")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    keep_freed_memory()
    exit_on_bad_input(lambda: demo() if not argv else train(parse_args(argv)))


if __name__ == "__main__":
    main()
