"""Where a command runs and in what precision: the one reader of ``--device`` and ``--dtype``
(chat, serve and bench), called before any weights are read so a bad value costs nothing.

    resolve_device("auto") -> cuda:0 with CUDA, else cpu;  "cpu" | "cuda" | "cuda:N" as named
    resolve_dtype("auto", device) -> bfloat16 on a GPU that has it in hardware, float16 on an
        older GPU, ``cpu`` (the command's own default) on the CPU
"""

from __future__ import annotations

import argparse
import re

import torch

from qwen2vl.errors import Qwen2VLError

DEVICE_CHOICES = "cpu, cuda, cuda:N or auto"
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
# argparse help; %(default)s is filled in by argparse
DEVICE_HELP = (
    "cpu, cuda, cuda:N, or auto: cuda:0 when CUDA is available, else cpu (default: %(default)s)"
)
DTYPE_HELP = (
    "weights' dtype; auto: bfloat16 on a GPU that has it in hardware, float16 on an older GPU, "
    "bfloat16 on the CPU (default: %(default)s)"
)
_DEVICE = re.compile(r"cpu|auto|cuda(:(0|[1-9][0-9]*))?")


def add_placement_arguments(p: argparse.ArgumentParser) -> None:
    """--device, --dtype, --quantize and --tensor-parallel-size: how chat and serve place the
    model (read by ``resolve_device``, ``resolve_dtype`` and ``load_for_inference``)."""
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    p.add_argument("--quantize", choices=["int8", "int4"], default=None, help="weight-only LLM")
    p.add_argument(
        "--tensor-parallel-size",
        type=int_at_least(1),
        default=1,
        help="split the LLM over N processes: run under torchrun --nproc-per-node N",
    )


def int_at_least(least: int):
    """An argparse type: an integer >= ``least``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}")
        return value

    return parse


class DeviceError(Qwen2VLError, ValueError):
    """A --device or --dtype value that names nothing this machine has."""


def resolve_device(text: str) -> torch.device:
    """``text`` as a device of this machine; a CUDA device gets its index (``cuda`` is cuda:0)."""
    if not _DEVICE.fullmatch(text):
        raise DeviceError(f"--device {text}: expected {DEVICE_CHOICES}", param="device")
    if text == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {text}: no CUDA device is available", param="device")
    device, count = torch.device(text), torch.cuda.device_count()
    index = device.index or 0
    if index >= count:
        have = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise DeviceError(f"--device {text}: this machine has {have}", param="device")
    return torch.device("cuda", index)


def resolve_dtype(
    text: str, device: torch.device, cpu: torch.dtype = torch.bfloat16
) -> torch.dtype:
    """``text`` as a dtype; ``auto`` picks by ``device`` (``cpu`` is what the CPU gets)."""
    if text not in DTYPE_CHOICES:
        raise DeviceError(f"--dtype {text}: expected {', '.join(DTYPE_CHOICES)}", param="dtype")
    if text != "auto":
        return getattr(torch, text)
    if device.type != "cuda":
        return cpu
    # bfloat16 runs in hardware from compute capability 8.0 (Ampere). Not is_bf16_supported():
    # by default it also says yes to emulated bfloat16 on older cards, and asks the current
    # device rather than this one.
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
