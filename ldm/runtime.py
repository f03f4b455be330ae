"""Process-wide settings of the runtime the models run on, set once by an entry point (never by a model).

`tune_cpu_allocator` makes glibc's malloc keep freed CPU buffers for reuse. By default glibc
serves large requests with a fresh mmap and gives freed memory at the top of the heap back to
the OS, so a forward pass whose activations run to tens of MB gets brand-new pages call after
call, and first touching a page costs a kernel page fault. At the DiT-F/2 sampling batch
(2 x 250 latents) that was 10,000-30,000 page faults per forward (the count depends on the
heap's history), ~5% of the forward's time on a 2-core CPU; with the tuning it is none.
"""

from __future__ import annotations

import ctypes
import platform
import re

import torch

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Free memory at the top of the heap that glibc may keep before it returns any to the OS: more
# than the activations of any forward this project runs on a CPU, so none is given back between calls.
_TRIM_THRESHOLD_BYTES = 1 << 30

_tuned = False


def tune_cpu_allocator() -> bool:
    """Make glibc reuse freed heap memory for large CPU tensors; return whether it applies (glibc only).

    Sets M_MMAP_MAX = 0, so that no request is served by its own mmap (a request at glibc's
    largest mmap threshold, 32 MiB, or above would still get one, and the hidden activations of
    a batch of 1000 DiT-F/2 latents are 64 MB), and M_TRIM_THRESHOLD = 1 GiB, so that freed
    memory stays in the heap instead of being trimmed and faulted in again on the next call.
    The cost is that the process keeps its peak heap. A no-op (False) off Linux or with another
    C library; safe to call more than once. Call it at the start of a process, before the work.
    """
    global _tuned
    if _tuned:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library the process (and PyTorch's CPU allocator) already uses
    # Trim threshold first: no mmap with glibc's default 128 kB trim threshold would be worse than
    # either default, every free at the top of the heap handing its pages back. mallopt returns 1 on success.
    _tuned = libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) == 1 and libc.mallopt(_M_MMAP_MAX, 0) == 1
    return _tuned


def synchronize(device: torch.device | None = None) -> None:
    """Wait for the device's queued kernels (CUDA runs them asynchronously) before a clock is read; a no-op elsewhere.

    device None: the current CUDA device when CUDA is in use.
    """
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    elif device.type == "cuda":
        torch.cuda.synchronize(device)


DEVICE_FORMS = "cpu, cuda, cuda:N or mps"


def check_device(name: str) -> str:
    """Return `name` when it is a device this machine has (cpu, cuda, cuda:N, mps); else ValueError saying why.

    Checked where a device is chosen (a command's --device, the pipeline's device), so that a typo or a
    missing GPU is one line before any model loads, not a CUDA traceback halfway through.
    """
    match = re.fullmatch(r"(cpu|mps|cuda)(?::(\d+))?", name.strip()) if isinstance(name, str) else None
    if match is None or (match[2] is not None and match[1] != "cuda"):
        raise ValueError(f"unknown device {name!r}: use {DEVICE_FORMS}")
    kind, index = match[1], match[2]
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {name!r}: CUDA is not available here ({why}); use cpu")
        count = torch.cuda.device_count()
        if index is not None and int(index) >= count:
            raise ValueError(f"device {name!r}: this machine has {count} CUDA devices (cuda:0 to cuda:{count - 1})")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS (Apple GPUs) is not available here; use cpu")
    return name.strip()
