"""
Train on WikiText-2: a dense teacher (from scratch or fine-tuned), or a SEA / Performer / window
student distilled from a teacher; with no arguments, the demo on SmolLM2-135M.

    python train.py                                            # the demo (SmolLM2, about 7 min on 2 cores)
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
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import eval as evaluate
from data import DATA_ENV, check_long_enough, get_batch, load_tokens
from eval import (ArgumentParser, autocast_context, available_device, exit_on_bad_input, non_negative_float,
                  non_negative_int, positive_float, positive_int)
from model import ATTENTION_KINDS, Decoder, DecoderConfig, PRESETS, is_pretrained_source, load_model, read_checkpoint
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
    official = args.method in OFFICIAL_BASELINES and args.copied_lr_scale == 1.0 and not args.attention_terms
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
    return torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95))


# -----------------------------------------------------------------------------
# the training objective: next-token loss, or distillation from a frozen teacher

def dense_map_terms(q, k, target, rows):
    """Summed over the query rows q (B, H, R, D) at positions `rows`: KL(target || softmax(q k^T)) and the
    squared error between the two maps, target the teacher's causal attention (B, H, R, T), k (B, H_kv, T, D).
    The student's log-probabilities are a log_softmax under a finite causal fill (finite gradients)."""
    scores = grouped_matmul(q, k.transpose(-2, -1)).float()
    log_p = scores.masked_fill(~causal_mask(rows, k.size(2)), torch.finfo(scores.dtype).min).log_softmax(-1)
    kl = (torch.xlogy(target, target) - target * log_p).sum()
    return kl, (log_p.exp() - target).square().sum()


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
            with torch.enable_grad():
                q_rows, k_seen = (t.detach().requires_grad_() for t in (q[:, :, first:last], k[:, :, :last]))
                kl, squares = dense_map_terms(q_rows, k_seen, target, rows)
                loss = 0.1 * kl / (B * H * T) + squares / (B * H * T * T)
                piece_q, piece_k = torch.autograd.grad(loss, (q_rows, k_seen))
            grad_q[:, :, first:last] += piece_q
            grad_k[:, :, :last] += piece_k
            total += loss.detach()
        ctx.save_for_backward(grad_q, grad_k)
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        grad_q, grad_k = ctx.saved_tensors
        return grad_loss * grad_q, grad_loss * grad_k, None


class Objective(nn.Module):
    """forward(x, y) -> (loss, terms). Without a teacher: cross-entropy. With one, the SEA paper's
    distillation loss: 0.1 LM + 5 hidden MSE + 0.2 logits KL, plus the per-layer attention terms
    when attention_terms (SEA's recipe; the official baselines train without them)."""

    def __init__(self, student, teacher=None, attention_terms=True):
        super().__init__()
        self.student, self.teacher, self.attention_terms = student, teacher, attention_terms

    def forward(self, x, y):
        if self.teacher is None:
            loss = self.student(x, y)[1]
            return loss, {"lm": loss}
        with torch.no_grad():
            (t_logits, t_hidden, _), t_layers = run_with_attention_hooks(self.teacher, x, self.attention_terms)
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
        (half a T x T map, one layer's at a time), for both map terms."""
        terms = {}
        teacher_pieces = list(causal_attention_pieces(teacher["q"], teacher["k"]))
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


def run_with_attention_hooks(model, x, need_layers=True, **flags):
    """model.forward_internals(x, need_layers=False, **flags) and, when need_layers, each layer's
    attention inputs and output, caught by hooks on the mechanisms: a list of dicts (q, k, v, context),
    q and context (B, H, T, D), k and v (B, H_kv, T, D). The mechanisms run as at inference (SDPA for
    a dense model): no T x T map."""
    captured = []
    keep = lambda mechanism, inputs, output: captured.append(dict(zip("qkv", inputs[:3]), context=output[0]))
    hooks = [block.self_attn.mechanism.register_forward_hook(keep) for block in model.layers] if need_layers else []
    try:
        outputs = model.forward_internals(x, need_layers=False, **flags)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, captured


def report_recall(student, teacher, val_tokens, args, when):
    """For students that keep a subset of keys: mask recall on the first validation windows,
    printed and returned (an empty dict for other students)."""
    if student.config.attn not in evaluate.MASKED_KINDS:
        return {}
    stats = evaluate.mask_statistics(student, teacher, val_tokens, args.block_size)
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
# the training loop

def train(args):
    rank, world, device = setup_distributed(args.device)
    master = rank == 0
    torch.manual_seed(args.seed + rank)
    ckpt_path = Path(args.out_dir) / "ckpt.pt"

    if args.resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path} (check --out-dir)")
        checkpoint = read_checkpoint(ckpt_path)
        model = Decoder.from_checkpoint_dict(checkpoint, str(ckpt_path))
        if checkpoint["iter"] >= args.max_iters:
            raise ValueError(f"--resume: {ckpt_path} is at iteration {checkpoint['iter']}, so "
                             f"--max-iters {args.max_iters} leaves nothing to train; raise --max-iters")
    else:
        checkpoint, model = None, build_student(args)
    teacher = load_teacher(args)
    args.block_size = args.block_size or model.config.block_size
    if args.block_size > model.config.block_size:
        raise ValueError(f"--block-size {args.block_size} exceeds the model's "
                         f"{model.config.block_size} learned positions")
    model.to(device)
    objective = Objective(model, teacher.to(device) if teacher is not None else None,
                          attention_terms=args.method != "dense" and args.attention_terms)
    optimizer = make_optimizer(model, args)
    start_iter, best_val = 0, float("inf")
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_iter, best_val = checkpoint["iter"], checkpoint["best_val"]
        if master:
            print(f"resumed from {ckpt_path} at iteration {start_iter}")

    train_tokens = load_tokens("train", args.data_dir, args.cache_dir, model.config.tokenizer)
    val_tokens = load_tokens("valid", args.data_dir, args.cache_dir, model.config.tokenizer)
    for split, tokens in (("train", train_tokens), ("valid", val_tokens)):
        check_long_enough(tokens, args.block_size + 2, f"{split} split")
    history = Path(args.out_dir) / "history.jsonl" if master else None
    if master and checkpoint is None:  # a fresh run starts a fresh history
        history.parent.mkdir(parents=True, exist_ok=True)
        history.write_text("")
    if (args.open_gates or args.training_free) and checkpoint is None:
        for block in model.layers:  # the student starts as the exact softmax over its kept keys (the warm-up's
            block.self_attn.mechanism.open_gates()  # recall is measured so too; it trains no gate)
    if args.estimator_iters and checkpoint is None:  # phase 1, before DDP copies rank 0's weights
        warm_up_estimator(model, objective.teacher, train_tokens, val_tokens, args, device, master, history)
        if args.estimator_overfit:
            if master:
                print(f"over-fit test done (no distillation, no checkpoint); its recall is in {history}")
            if world > 1:
                torch.distributed.destroy_process_group()
            return None
    if args.training_free:  # the warm-up was all: the teacher's weights, SEA's estimate, exact sparse softmax
        if master:
            save_checkpoint(ckpt_path, model, optimizer, 0, float("nan"), args)
            print(f"training-free SEA (estimator warm-up only, gates open): saved {ckpt_path}")
        return ckpt_path
    ddp_objective = objective
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        ddp_objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "float16")
    generator = torch.Generator().manual_seed(args.seed + rank)
    for _ in range(start_iter * args.grad_accum):  # a resumed run goes on with the windows it would have drawn
        get_batch(train_tokens, args.batch_size, args.block_size, generator, "cpu")
    tokens_per_iter = args.batch_size * args.block_size * args.grad_accum * world
    if master:
        print(f"{args.method}: {model.num_params() / 1e6:.1f}M parameters, attn={model.config.attn}, "
              f"{tokens_per_iter:,} tokens per iteration on {world} x {device} ({args.dtype})")
        if args.method != "dense":
            print(recipe(args))

    model.train()
    started = last_log = time.time()
    for it in range(start_iter, args.max_iters):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, args) * group["lr_scale"]
        for micro in range(args.grad_accum):
            x, y = get_batch(train_tokens, args.batch_size, args.block_size, generator, device)
            sync = micro == args.grad_accum - 1 or world == 1
            with (nullcontext() if sync else ddp_objective.no_sync()), autocast_context(device, args.dtype):
                loss, terms = ddp_objective(x, y)
            scaler.scale(loss / args.grad_accum).backward()
        if args.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        done = it + 1
        if master and (done % args.log_interval == 0 or done == args.max_iters):
            now = time.time()
            iters = done - max(start_iter, done - args.log_interval)
            shown = " ".join(f"{name} {value.item():.4f}" for name, value in terms.items())
            print(f"iter {done}/{args.max_iters} | loss {loss.item():.4f} ({shown}) | "
                  f"lr {lr_at(it, args):.2e} | {iters * tokens_per_iter / (now - last_log):,.0f} tok/s | "
                  f"{now - started:.0f}s{peak_memory(device)}", flush=True)
            last_log = now
        if master and (done % args.eval_interval == 0 or done == args.max_iters):
            val = estimate_val_loss(model, val_tokens, args, device)
            if not math.isfinite(val):  # a diverged run never overwrites a good checkpoint
                raise ValueError(f"validation loss is {val} at iteration {done}: training diverged "
                                 f"(try a lower --lr); {ckpt_path} was left as it was")
            best_val = min(best_val, val)
            save_checkpoint(ckpt_path, model, optimizer, done, best_val, args)
            print(f"iter {done}: val loss {val:.4f} (ppl {math.exp(val):.1f}), saved {ckpt_path}",
                  flush=True)
            stats = report_recall(model, objective.teacher, val_tokens, args, f"iter {done}")
            record(history, phase=args.method, step=done, tokens=done * tokens_per_iter, val_loss=val, **stats)
    if world > 1:
        torch.distributed.destroy_process_group()
    return ckpt_path


# -----------------------------------------------------------------------------
# command line

def parse_args(argv):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=ATTENTION_KINDS, default="dense",
                   help="dense: train a teacher; the others distill a student from --teacher (window, "
                        "sink-window: SEA's controls; performer, reformer: the paper's baselines)")
    p.add_argument("--teacher", help="teacher for the students: a train.py checkpoint, a GGUF file, a Hugging "
                                     "Face directory, a hub name, or smollm2-135m (fetched once)")
    p.add_argument("--k", type=positive_int, default=SEAConfig.k,
                   help="SEA/window: kept keys per query per head, on average over the heads (SEA's budget "
                        "is shared by them); reformer: the bucket size")
    p.add_argument("--t-m", type=positive_int, default=SEAConfig.t_m,
                   help="SEA: T_M, the predictor length: bins per compressed attention row")
    p.add_argument("--nbf", type=positive_float, help="SEA/window/performer: feature factor, "
                                                       "m = D ln D / nbf features (default 8; performer 1)")
    p.add_argument("--n-hashes", type=positive_int, default=ReformerConfig.n_hashes, help="reformer: hash rounds")
    p.add_argument("--official-chunks", action="store_true",
                   help="reformer: the official fixed chunks of the sorted order (not strictly causal)")
    p.add_argument("--copied-lr-scale", type=non_negative_float,
                   help="learning-rate factor of the weights copied from the teacher (default 0.2; "
                        "the official performer/reformer recipe 1.0)")
    p.add_argument("--attention-terms", action=argparse.BooleanOptionalAction,
                   help="the per-layer attention loss terms (default on; off for performer/reformer, "
                        "as the official code trains them)")
    p.add_argument("--estimator", choices=ESTIMATORS, default=SEAConfig.estimator,
                   help="SEA: the paper's estimator, or ours (residual): a learned residual on a training-free "
                        "estimate from the keys, which it equals before training")
    p.add_argument("--block", type=positive_int, default=SEAConfig.block,
                   help="block-mean, block-bound: keys per block")
    p.add_argument("--sub-bins", type=positive_int, default=SEAConfig.sub_bins,
                   help="sea --estimator residual, sea-heuristic: finer bins per bin of the heuristic estimate")
    p.add_argument("--sink-bin", action="store_true",
                   help="SEA, beyond the paper: every head of every row keeps the bin that holds key 0 (the "
                        "attention sink of pretrained models), within the same budget")
    p.add_argument("--estimator-iters", type=non_negative_int, default=0,
                   help="SEA: first train the estimator alone for this many steps (0 = off)")
    p.add_argument("--estimator-lr", type=positive_float,
                   help="SEA: learning rate of the estimator warm-up (default 10 x --lr)")
    p.add_argument("--training-free", action="store_true",
                   help="sea: stop after the estimator warm-up and save the student with its gates open (the "
                        "teacher's weights, SEA's choice of keys, exact softmax over them); no distillation")
    p.add_argument("--open-gates", action="store_true",
                   help=f"{'/'.join(GATED_KINDS)}: distill from open gates, the student starting as the exact "
                        "softmax over its kept keys (for a pretrained teacher; the paper starts them closed)")
    p.add_argument("--estimator-overfit", action="store_true",
                   help="SEA, the over-fit test: the warm-up trains on the very validation windows its "
                        "recall is measured on, then the run stops (no distillation, no checkpoint)")
    p.add_argument("--preset", default="tiny", help=f"model shape for training from scratch: {sorted(PRESETS)}")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout of a model trained from scratch")
    p.add_argument("--init-from", help="start from a train.py checkpoint, a pretrained model (smollm2-135m, a "
                                       "llama GGUF file), a Hugging Face directory "
                                       "or a hub name (facebook/opt-125m)")
    p.add_argument("--out-dir", help="where ckpt.pt goes (default out/<method>-<preset>, or "
                                     "out/<method>-<name> for a student of a named pretrained model)")
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt")
    p.add_argument("--data-dir", help=f"WikiText-2 folder (default ${DATA_ENV}, else download)")
    p.add_argument("--cache-dir", help="token and download cache (default $SEA_CACHE_DIR or .cache/)")
    p.add_argument("--block-size", type=positive_int, help="training sequence length (default: the model's)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-iters", type=positive_int, help="optimizer steps (default 600 dense, 250 distilling)")
    p.add_argument("--lr", type=positive_float, help="peak base learning rate (default 1e-3 from scratch, "
                                            "2e-5 fine-tuning, 1e-4 distilling)")
    p.add_argument("--min-lr", type=non_negative_float, help="final learning rate (default lr / 10)")
    p.add_argument("--warmup-iters", type=non_negative_int, help="default max-iters / 12")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.1)
    p.add_argument("--grad-clip", type=non_negative_float, default=1.0)
    p.add_argument("--eval-interval", type=positive_int, help="iterations between validation losses "
                                                     "(default max-iters / 3, then at the end)")
    p.add_argument("--eval-iters", type=positive_int, default=20)
    p.add_argument("--log-interval", type=positive_int, default=10)
    p.add_argument("--device", type=available_device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype (default float32 on CPU, where bfloat16 ran 5x slower on "
                        "SmolLM2; bfloat16 on capable GPUs, else float16)")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    return fill_defaults(args, p)


def fill_defaults(args, parser):
    if args.preset not in PRESETS:
        parser.error(f"unknown preset {args.preset!r}: choose one of {sorted(PRESETS)}")
    for flag in ("init_from", "teacher"):
        path = getattr(args, flag)
        if path and not (Path(path).exists() or is_pretrained_source(path)):
            parser.error(f"--{flag.replace('_', '-')} {path}: no such file or directory")
    if args.method != "dense" and not args.teacher:
        parser.error(f"--method {args.method} distills from a teacher: pass --teacher "
                     f"(e.g. out/dense-tiny/ckpt.pt from 'python train.py --method dense')")
    if args.method == "dense" and args.teacher:
        parser.error("--teacher is for the students (--method sea/window/performer); a dense model "
                     "starts from --init-from")
    baseline = args.method in OFFICIAL_BASELINES
    args.nbf = args.nbf or (1.0 if args.method == "performer" else SEAConfig.nbf)
    args.copied_lr_scale = args.copied_lr_scale if args.copied_lr_scale is not None else (1.0 if baseline else 0.2)
    args.attention_terms = args.attention_terms if args.attention_terms is not None else not baseline
    try:
        sea_config(args)
    except ValueError as e:
        parser.error(str(e))
    if args.sink_bin and args.method != "sea":
        parser.error("--sink-bin changes SEA's choice of bins: use it with --method sea")
    if args.estimator != SEAConfig.estimator and args.method != "sea":
        parser.error(f"--estimator chooses SEA's estimator: use it with --method sea, not {args.method}")
    if args.estimator_iters and args.method != "sea":
        parser.error("--estimator-iters warms up SEA's estimator: use it with --method sea")
    if args.training_free and not (args.method == "sea" and args.estimator_iters):
        parser.error("--training-free saves SEA after its estimator warm-up: use it with --method sea "
                     "--estimator-iters N")
    if args.open_gates and args.method not in GATED_KINDS:
        parser.error(f"--open-gates opens the gates of {', '.join(GATED_KINDS)}; --method {args.method} has none")
    if args.estimator_overfit and not args.estimator_iters:
        parser.error("--estimator-overfit trains the warm-up on fixed windows: give it --estimator-iters N")
    source = args.teacher or args.init_from  # a student of a named pretrained model is named after it
    named = source and not Path(source).exists()
    args.out_dir = args.out_dir or f"out/{args.method}-{source.replace('/', '-') if named else args.preset}"
    args.max_iters = args.max_iters or (600 if args.method == "dense" else 250)
    args.warmup_iters = args.warmup_iters if args.warmup_iters is not None else args.max_iters // 12
    args.eval_interval = args.eval_interval or -(-args.max_iters // 3)  # ceil: thirds, then the end
    default_lr = 1e-4 if args.method != "dense" else 2e-5 if args.init_from else 1e-3
    args.lr = args.lr or default_lr
    args.min_lr = args.min_lr if args.min_lr is not None else args.lr / 10
    args.estimator_lr = args.estimator_lr or 10 * args.lr
    if args.dtype is None:
        cuda_bf16 = args.device.startswith("cuda") and torch.cuda.is_bf16_supported()
        args.dtype = "float32" if args.device == "cpu" else "bfloat16" if cuda_bf16 else "float16"
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout {args.dropout} must be in [0, 1)")
    return args


# -----------------------------------------------------------------------------
# the demo: python train.py with no arguments

TEST_DATA_ENV = "SEA_TEST_DATA_DIR"  # the demo's test text, when it is not in the training folder
DEMO_SWAPS = (*CONTROLS, "perfect-estimate", "oracle")  # no training: only the key choice


def demo(source="smollm2-135m", block_size=512, k=16, t_m=64, warm_up_steps=20, windows=4,
         out_dir="out/demo"):
    """SmolLM2-135M, frozen, with only its attention swapped: SEA after an estimator warm-up (ours,
    then the paper's estimator), the controls, the perfect estimate and the oracle, each keeping
    about k keys per query per head (3% of a late row at T = 512). Test
    perplexity of the first `windows` windows and late-row recall, as a table, JSON and pictures."""
    started = time.time()
    step = lambda text: print(f"== {text}  [{time.time() - started:.0f}s]", flush=True)
    knobs = ["--teacher", source, "--block-size", str(block_size), "--k", str(k),
             "--t-m", str(t_m)]
    step(f"1/4 the teacher: {source}")
    teacher = load_model(source).eval()
    tokens = load_tokens("test", os.environ.get(TEST_DATA_ENV), None, teacher.config.tokenizer)
    device = parse_args(["--method", "sea", *knobs]).device
    measure = lambda model, teacher_ppl=None: evaluate.describe(
        model.to(device), teacher if teacher_ppl else None, tokens, block_size, 1, device, "float32",
        teacher_ppl, max_windows=windows)
    rows = {"dense teacher": dict(measure(teacher.to(device)), ratio=1.0)}
    teacher_ppl = rows["dense teacher"]["ppl"]
    students = {}
    for number, (name, estimator) in enumerate((("sea, residual", "residual"), ("sea, paper's", "paper")), start=2):
        command = ["--method", "sea", *knobs, "--estimator", estimator, "--training-free", "--estimator-iters",
                   str(warm_up_steps), "--estimator-lr", "3e-3", "--batch-size", "1",
                   "--out-dir", f"{out_dir}/sea-{estimator}"]
        step(f"{number}/4 {name}: python train.py {' '.join(command)}")
        students[name] = Decoder.from_checkpoint(train(parse_args(command)))
        rows[name] = measure(students[name], teacher_ppl)
    step(f"4/4 training-free swaps of the teacher's attention: {', '.join(DEMO_SWAPS)}")
    for kind in DEMO_SWAPS:
        model = load_model(source, attn=kind, sea=SEAConfig(k=k, t_m=t_m))
        for block in model.layers:
            block.self_attn.mechanism.open_gates()
        rows[kind] = measure(model, teacher_ppl)
    print(f"\ntest split, first {windows} windows of {block_size} tokens, k = {k}, T_M = {t_m}, "
          f"{time.time() - started:.0f}s in all")
    print(evaluate.table_header())
    for name, row in rows.items():
        print(evaluate.format_row(name, row))
    print(f"recall: the teacher's attention mass on the kept keys, late rows (the second half of each of the "
          f"first {evaluate.RECALL_WINDOWS} windows); the other columns keep as many keys per (head, row): the "
          f"most recent, the first {SEAConfig.sinks} plus the most recent, SEA's bins chosen by the teacher's "
          f"mass, the teacher's own top keys")
    evaluate.write_records(rows, f"{out_dir}/table.json")
    evaluate.plot_attention(students["sea, residual"], teacher, tokens, block_size, f"{out_dir}/attention.png")
    evaluate.plot_layer_recall(rows, f"{out_dir}/recall-per-layer.png")
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    exit_on_bad_input(lambda: demo() if not argv else train(parse_args(argv)))


if __name__ == "__main__":
    main()
