"""
Evaluate a model on WikiText-2.

    python eval.py --ckpt out/dense-tiny/ckpt.pt                 # test perplexity
    python eval.py --init-from facebook/opt-125m --split valid   # a Hugging Face OPT

Perplexity protocol (SEA.md section 5): the split's text tokenized once, cut into
non-overlapping windows of --block-size tokens; every window scores the next-token
predictions inside it; perplexity = exp(mean token NLL).
"""

import argparse
import math
import sys

import torch
import torch.nn.functional as F

from train import SPLITS, autocast_context, load_model, load_tokens


@torch.no_grad()
def perplexity(model, tokens, block_size, batch_size=8, device="cpu", dtype="float32"):
    """Returns (perplexity, tokens scored) over non-overlapping windows of block_size tokens."""
    device = torch.device(device)
    model.eval()
    ids = torch.as_tensor(tokens.astype("int64"))
    windows = [ids[s:s + block_size] for s in range(0, len(ids), block_size)]
    windows = [w for w in windows if len(w) >= 2]  # a lone last token predicts nothing
    total_nll, scored = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        for length in sorted({len(w) for w in batch}):  # the last window may be shorter
            x = torch.stack([w for w in batch if len(w) == length]).to(device)
            with autocast_context(device, dtype):
                logits, _ = model(x)
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum")
            total_nll += nll.item()
            scored += x[:, 1:].numel()
    return math.exp(total_nll / scored), scored


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a checkpoint written by train.py")
    source.add_argument("--init-from", help="a Hugging Face OPT directory or hub name")
    p.add_argument("--split", choices=SPLITS, default="test")
    p.add_argument("--block-size", type=int, help="window length (default: the model's block_size)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data-dir", help="WikiText-2 folder (default $SEA_DATA_DIR, else download)")
    p.add_argument("--cache-dir", help="token and download cache (default $SEA_CACHE_DIR or .cache/)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    model = load_model(args.ckpt or args.init_from).to(args.device)
    block_size = args.block_size or model.config.block_size
    if not 2 <= block_size <= model.config.block_size:
        p.error(f"--block-size {block_size} must be between 2 and the model's {model.config.block_size}")
    tokens = load_tokens(args.split, args.data_dir, args.cache_dir)
    ppl, scored = perplexity(model, tokens, block_size, args.batch_size, args.device, args.dtype)
    print(f"{args.split} perplexity {ppl:.2f} over {scored:,} tokens "
          f"(windows of {block_size}, attn={model.config.attn})")
    return ppl


if __name__ == "__main__":
    main()
