"""Native memory bounds: when free heap pages go back to the OS, and that the oneDNN cap reaches oneDNN."""

import os
import subprocess
import sys

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
        "from service.memory import cap_primitive_cache\n"
        "if sys.argv[1] != 'default': cap_primitive_cache(int(sys.argv[1]))\n"
        "layer = torch.nn.Linear(32, 64).to(torch.bfloat16)\n"
        "with torch.inference_mode():\n"
        "    for _ in range(2): layer(torch.ones(8, 32, dtype=torch.bfloat16))\n"
    )

    def cache_events(capacity: str) -> list[str]:
        env = {**os.environ, "ONEDNN_VERBOSE": "all"}
        env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
        out = subprocess.run([sys.executable, "-c", script, capacity], env=env, capture_output=True, text=True,
                             check=True, timeout=120).stdout
        return [line.split(",")[3] for line in out.splitlines() if ",primitive,create:" in line]

    default = cache_events("default")
    if not default:  # no oneDNN bf16 matmul on this CPU: nothing is cached, nothing to cap
        return
    assert default == ["create:cache_miss", "create:cache_hit"]
    assert cache_events("0") == ["create:cache_miss", "create:cache_miss"]
