"""Process-wide runtime settings: the glibc allocator tuning (each case in its own process, since it is global)."""

import platform
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc"
)

# Page faults taken by the last of 12 alloc + fill + free rounds of a 36 MB float32 tensor (over
# glibc's 32 MiB cap on its mmap threshold). Not the first ones: glibc's posix_memalign, which
# PyTorch allocates with, keeps each round's small alignment fragment in a per-thread cache that
# holds 7, and until it is full those fragments stop the freed buffers from merging into one that fits.
FAULTS_OF_A_REPEATED_LARGE_BUFFER = """
import resource, sys, torch
from ldm.runtime import tune_cpu_allocator
tuned = [tune_cpu_allocator(), tune_cpu_allocator()] if sys.argv[1] == "tune" else []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = torch.empty(9 << 20)
    buffer.fill_(1.0)
    del buffer
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(tuned, faults)
"""


def faults_of_a_repeated_large_buffer(mode: str) -> tuple[str, int]:
    """Return what tune_cpu_allocator returned twice ("[]" when not called) and the last round's page faults."""
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_OF_A_REPEATED_LARGE_BUFFER, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return " ".join(out[:-1]), int(out[-1])


@pytest.mark.slow
@glibc_only
def test_tuned_allocator_reuses_a_large_freed_buffer_instead_of_faulting_in_fresh_pages():
    tuned, faults = faults_of_a_repeated_large_buffer("tune")
    assert tuned == "[True, True]"  # applies, and a second call is harmless
    assert faults < 100  # 36 MB is 9,216 pages of 4 kB


@pytest.mark.slow
@glibc_only
def test_default_allocator_maps_a_large_buffer_fresh_on_every_call():
    # The reason for the tuning: without it every round touches fresh pages.
    _, faults = faults_of_a_repeated_large_buffer("default")
    assert faults > 9_000
