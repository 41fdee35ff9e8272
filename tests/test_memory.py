"""Native memory bounds: when free heap pages go back to the OS, and that the primitive cache caps take effect."""

import os
import subprocess
import sys

import pytest

from service.memory import IdleTrim, release_free_heap


def test_the_heap_is_released_once_per_quiet_spell_after_requests():
    trim = IdleTrim(idle_seconds=1.0)
    assert not trim.due(0.0, requests_seen=0, in_flight=0)
    assert not trim.due(5.0, requests_seen=0, in_flight=0)  # never any request: nothing to give back
    assert not trim.due(6.0, requests_seen=10, in_flight=3)
    assert not trim.due(7.0, requests_seen=12, in_flight=0)  # requests still arriving
    assert not trim.due(7.5, requests_seen=12, in_flight=0)  # quiet for 0.5 s only
    assert trim.due(8.0, requests_seen=12, in_flight=0)
    assert not trim.due(9.0, requests_seen=12, in_flight=0)  # once per quiet spell
    assert not trim.due(20.0, requests_seen=12, in_flight=0)
    assert not trim.due(21.0, requests_seen=13, in_flight=1)
    assert not trim.due(21.5, requests_seen=13, in_flight=0)
    assert trim.due(22.5, requests_seen=13, in_flight=0)


def test_a_request_running_for_long_is_not_quiet():
    trim = IdleTrim(idle_seconds=1.0)
    assert not trim.due(0.0, requests_seen=1, in_flight=1)
    assert not trim.due(30.0, requests_seen=1, in_flight=1)
    assert not trim.due(30.5, requests_seen=1, in_flight=0)
    assert trim.due(31.5, requests_seen=1, in_flight=0)


def test_zero_seconds_turns_it_off():
    trim = IdleTrim(idle_seconds=0)
    assert not trim.due(0.0, requests_seen=5, in_flight=0)
    assert not trim.due(100.0, requests_seen=5, in_flight=0)


def test_releasing_the_heap_works_here():
    assert release_free_heap() >= 0.0


def test_the_primitive_cache_cap_reaches_onednn():
    """With the cap at 0 a repeated shape is compiled again; with oneDNN's default it comes from the cache."""
    script = (
        "import sys, torch\n"
        "from service.memory import cap_primitive_caches\n"
        "if sys.argv[1] != 'default': cap_primitive_caches(int(sys.argv[1]), 1024)\n"
        "layer = torch.nn.Linear(32, 64).to(torch.bfloat16)\n"
        "with torch.inference_mode():\n"
        "    for _ in range(2): layer(torch.ones(8, 32, dtype=torch.bfloat16))\n"
    )

    def cache_events(capacity: str) -> list[str]:
        env = {**os.environ, "ONEDNN_VERBOSE": "all"}
        env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
        out = subprocess.run([sys.executable, "-c", script, capacity], env=env, capture_output=True, text=True, check=True, timeout=120).stdout
        return [line.split(",")[3] for line in out.splitlines() if ",primitive,create:" in line]

    default = cache_events("default")
    if not default:  # no oneDNN bf16 matmul on this CPU: nothing is cached, nothing to cap
        return
    assert default == ["create:cache_miss", "create:cache_hit"]
    assert cache_events("0") == ["create:cache_miss", "create:cache_miss"]


GROWTH_SCRIPT = """
import ctypes, random, sys, torch
from service.memory import cap_primitive_caches
cap_primitive_caches(4, int(sys.argv[1]))  # oneDNN's own cache small in both runs

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
in_use = lambda: libc.mallinfo2().uordblks + libc.mallinfo2().hblkhd
layer, shapes = torch.nn.Linear(384, 1536), random.Random(0)
with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
    layer(torch.ones(1, 8, 384))
    before = in_use()
    for _ in range(200):
        layer(torch.ones(shapes.randint(1, 32), shapes.choice(range(8, 257, 8)), 384))
print((in_use() - before) / 2**20)
"""


def test_the_torch_primitive_cache_cap_bounds_the_heap_under_varied_shapes():
    """PyTorch's own primitive cache (ideep's LRU_CACHE_CAPACITY) grows the heap with every new batch shape up to
    its default of 1024 entries; capped, it stays small."""
    if not os.path.exists("/lib/x86_64-linux-gnu/libc.so.6") and not os.path.exists("/usr/lib64/libc.so.6"):
        pytest.skip("glibc's mallinfo2 is needed to read the heap")

    def growth_mib(capacity: int) -> float:
        env = {key: value for key, value in os.environ.items() if key not in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")}
        out = subprocess.run(
            [sys.executable, "-c", GROWTH_SCRIPT, str(capacity)], env=env, capture_output=True, text=True, check=True, timeout=300
        ).stdout
        return float(out.strip().splitlines()[-1])

    uncapped = growth_mib(1024)
    if uncapped < 20:  # no oneDNN bf16 path on this CPU: nothing is cached, nothing to cap
        pytest.skip(f"the heap grew only {uncapped:.0f} MiB uncapped")
    assert growth_mib(4) < uncapped / 3
