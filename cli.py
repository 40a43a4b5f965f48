"""
The command-line helpers eval.py, train.py and bench.py share: bad input ends in one line,
'error: ...', never a traceback; argparse types that check their bounds; autocast; raw figures as JSON.
"""

import argparse
import ctypes
import json
import math
import sys
from contextlib import nullcontext
from pathlib import Path

import torch


def autocast_context(device, dtype):
    """Mixed precision for `dtype` ("float32" runs without autocast)."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype))


def keep_freed_memory():
    """Have glibc keep freed memory for the next tensors. By default it hands every freed block above a few MB
    back to the system, so the next large tensor (a layer's maps, the logits) is paged in and zeroed afresh:
    about 1.2 million page faults a training-free row of the demo, 10% of its time. Elsewhere than glibc
    (macOS, musl) nothing changes."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    libc.mallopt(M_MMAP_MAX, 0)  # large blocks from the heap too, not from mmap: freed, they stay for reuse
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # and the heap's top is not trimmed back to the system


def write_records(records, path):
    """Raw figures as JSON: the benchmarks' (one object per measurement, docs/bench-*.json) or an
    evaluation's row."""
    Path(path).write_text(json.dumps(records, indent=1) + "\n")
    print(f"wrote {path}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, 'error: ...', without the usage text."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def bounded(kind, low, inclusive):
    """An argparse type: a finite `kind` (int or float) above `low`, or from `low` when inclusive."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'at least' if inclusive else 'more than'} {low}, "
                                             f"got {text}")
        return value
    return parse


positive_int, non_negative_int = bounded(int, 0, inclusive=False), bounded(int, 0, inclusive=True)
positive_float, non_negative_float = bounded(float, 0, inclusive=False), bounded(float, 0, inclusive=True)


def available_device(text):
    """--device: a device PyTorch knows and this machine has."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device name (cpu, cuda, cuda:1, mps)") from None
    present = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not present.get(device.type, False):
        raise argparse.ArgumentTypeError(f"{text}: this machine has no such device (this PyTorch sees "
                                         f"{', '.join(name for name, there in present.items() if there)})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: no such device, this machine has {torch.cuda.device_count()} "
                                         f"CUDA device(s)")
    return text


def length_list(text):
    """--bench-lengths: comma-separated positive sequence lengths."""
    return [positive_int(part) for part in text.split(",")]


def number_list(text):
    """--passkey-depths: comma-separated numbers."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def exit_on_bad_input(run):
    """Run a command; bad input and missing files (ValueError, OSError) end in 'error: ...'."""
    try:
        return run()
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
