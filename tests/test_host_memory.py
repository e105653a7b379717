"""jaxbased.host_memory: with glibc told to keep freed memory, a large block freed and allocated
again costs no fresh pages; left alone, every round faults the whole block in again."""

from __future__ import annotations

import json
import pathlib
import platform
import subprocess
import sys

import pytest

from jaxbased.host_memory import host_malloc_policy

REPO = pathlib.Path(__file__).resolve().parents[1]

# A 64 MiB block (above glibc's largest mmap threshold), written, freed, allocated again: the
# minor page faults of the last 3 of 4 rounds, the way XLA:CPU allocates a call's buffers.
ROUNDS = """
import ctypes, json, resource, sys
sys.path.insert(0, {repo!r})
from jaxbased.host_memory import apply_host_malloc_policy
kept = apply_host_malloc_policy()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 * 2**20
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({{"kept": kept, "faults": faults[1:]}}))
"""


def rounds(policy: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", ROUNDS.format(repo=str(REPO))],
        env={"JAXBASED_HOST_MALLOC": policy, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(result.stdout)


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the policy configures glibc's malloc; other C libraries are left alone",
)
def test_kept_memory_is_reused_without_page_faults():
    pages = 64 * 2**20 // 4096
    system = rounds("system")
    assert not system["kept"]
    assert min(system["faults"]) > 0.9 * pages, system  # fresh pages every round
    keep = rounds("keep")
    assert keep["kept"]
    assert max(keep["faults"]) < 0.01 * pages, keep  # the freed block is reused


def test_the_policy_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv("JAXBASED_HOST_MALLOC", raising=False)
    assert host_malloc_policy() == "keep"
    monkeypatch.setenv("JAXBASED_HOST_MALLOC", "System")
    assert host_malloc_policy() == "system"
    monkeypatch.setenv("JAXBASED_HOST_MALLOC", "tcmalloc")
    with pytest.raises(ValueError, match=r"JAXBASED_HOST_MALLOC='tcmalloc'.*keep, system"):
        host_malloc_policy()
