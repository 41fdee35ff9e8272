"""`--workers N`: N API processes and one engine process, as real processes on a loopback port.

Which API process serves a connection is found from /proc (the process holding the server's end of the TCP
connection), so the tests can send texts through chosen processes without the API saying anything new.
"""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, free_port, run_service

pytestmark = pytest.mark.integration

BOUND = 60  # seconds any wait may take on a loaded machine before the test fails


def wait_for(condition: Callable[[], bool], what: str, timeout: float = BOUND) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def children(pid: int) -> dict[int, str]:
    """The child processes of `pid`, by their name (comm): clf-engine, clf-api-0, ..."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
            if int(rest[1]) == pid:
                found[int(entry)] = name
    return found


def api_processes(supervisor: int) -> list[int]:
    return sorted(pid for pid, name in children(supervisor).items() if name.startswith("clf-api"))


def engine_process(supervisor: int) -> int:
    return next(pid for pid, name in children(supervisor).items() if name == "clf-engine")


def serving_process(connection: http.client.HTTPConnection, candidates: list[int]) -> int:
    """The process among `candidates` holding the server's end of `connection`."""
    client_port = connection.sock.getsockname()[1]
    server_port = connection.sock.getpeername()[1]
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port, remote_port = int(fields[1].split(":")[-1], 16), int(fields[2].split(":")[-1], 16)
            if (local_port, remote_port) == (server_port, client_port):
                inodes.add(fields[9])
    for pid in candidates:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return pid
    raise AssertionError("no API process holds the connection")


def connections_to_each_process(url: str, supervisor: int, workers: int = 2, per_process: int = 1) -> dict[int, list[http.client.HTTPConnection]]:
    """Open keep-alive connections until each of the `workers` API processes, ready, holds `per_process` of them."""
    host, port = url.removeprefix("http://").split(":")
    wait_for(lambda: len(api_processes(supervisor)) == workers, f"{workers} API processes")
    pids = api_processes(supervisor)
    held: dict[int, list[http.client.HTTPConnection]] = {pid: [] for pid in pids}
    deadline = time.monotonic() + BOUND
    while any(len(held[pid]) < per_process for pid in pids):
        assert time.monotonic() < deadline, "the kernel never handed a connection to some ready API process"
        connection = http.client.HTTPConnection(host, int(port), timeout=BOUND)
        connection.request("GET", "/ready")
        response = connection.getresponse()
        response.read()
        pid = serving_process(connection, pids)
        if response.status == 200 and len(held[pid]) < per_process:
            held[pid].append(connection)
        else:
            connection.close()
    return held


def post(connection: http.client.HTTPConnection, body: dict) -> tuple[int, dict]:
    connection.request("POST", "/classify", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def samples(url: str) -> dict[str, float]:
    found = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=BOUND).text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


@pytest.fixture(scope="module")
def two_workers(tiny_model_dir):
    """Two API processes; a batch flushes at 2 texts or after 1.5 s, so two texts sent together share one."""
    env = {"CLASSIFIER_WORKERS": "2", "CLASSIFIER_MAX_BATCH_SIZE": "2", "CLASSIFIER_BATCH_WINDOW_MS": "1500"}
    with run_service(tiny_model_dir, env) as (url, process):
        yield url, process


def test_texts_sent_to_different_workers_share_a_batch_and_get_their_alone_scores(two_workers):
    url, process = two_workers
    held = connections_to_each_process(url, process.pid)
    (first, *_), (second, *_) = held.values()
    texts = ["great film", "awful plot"]  # the same token count: one bucket
    alone = [post(first, {"texts": [texts[0]]}), post(second, {"texts": [texts[1]]})]
    assert [status for status, _ in alone] == [200, 200]
    before = samples(url)
    together: dict[int, tuple[int, dict]] = {}
    senders = [
        threading.Thread(target=lambda i=i, c=c: together.__setitem__(i, post(c, {"texts": [texts[i]]}))) for i, c in enumerate((first, second))
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(BOUND)
    after = samples(url)
    assert after["classifier_batch_size_count"] - before["classifier_batch_size_count"] == 1
    assert after["classifier_batch_size_sum"] - before["classifier_batch_size_sum"] == 2
    for i in range(2):
        status, body = together[i]
        assert status == 200
        assert body["results"][0]["label"] == alone[i][1]["results"][0]["label"]
        assert body["results"][0]["score"] == pytest.approx(alone[i][1]["results"][0]["score"], abs=1e-5)


def test_metrics_are_summed_across_workers(two_workers):
    url, process = two_workers
    held = connections_to_each_process(url, process.pid)
    before = samples(url)
    sent = {pid: 3 + index for index, pid in enumerate(held)}  # a different count through each process
    for pid, count in sent.items():
        for _ in range(count):
            assert post(held[pid][0], {"texts": ["good", "bad"]})[0] == 200
    for connection, *_ in held.values():  # every process tells the same, whole story
        connection.request("GET", "/metrics")
        families = text_string_to_metric_families(connection.getresponse().read().decode())
        counted = {f"{s.name}{s.labels}": s.value for family in families for s in family.samples}
        key = "classifier_requests_total{'route': '/classify', 'status': '200'}"
        assert counted[key] - before["classifier_requests_total{route=/classify,status=200}"] == sum(sent.values())
        assert counted["classifier_classified_texts_total{}"] - before["classifier_classified_texts_total"] == 2 * sum(sent.values())
        assert counted["classifier_model_info{'device': 'cpu', 'model': " + repr(str(_model_of(url))) + ", 'precision': 'fp32'}"] == 1
        # the labels one process serves (tests/test_strategies_service.py), each API process's from the engine's facts
        assert counted["classifier_batching_info{'batching': 'buckets', 'padding': 'dynamic'}"] == 1


def _model_of(url: str) -> str:
    return httpx.get(f"{url}/info", timeout=BOUND).json()["model"]


def test_ready_and_info_reflect_the_engine(two_workers):
    url, process = two_workers
    held = connections_to_each_process(url, process.pid)
    for connection, *_ in held.values():
        connection.request("GET", "/ready")
        response = connection.getresponse()
        assert (response.status, json.loads(response.read())) == (200, {"status": "ready"})
        connection.request("GET", "/info")
        info = json.loads(connection.getresponse().read())
        assert info["settings"]["workers"] == 2
        assert info["batching"]["max_batch_size"] == 2 and info["labels"] == ["NEGATIVE", "POSITIVE"]


def test_sigterm_answers_every_text_accepted_by_every_worker_then_exits_0(tiny_model_dir):
    env = {"CLASSIFIER_WORKERS": "2", "CLASSIFIER_BATCH_WINDOW_MS": "3000", "CLASSIFIER_MAX_BATCH_SIZE": "64"}
    with run_service(tiny_model_dir, env) as (url, process):
        held = connections_to_each_process(url, process.pid, per_process=4)
        connections = [c for group in held.values() for c in group]
        answers: list[tuple[int, dict]] = []
        senders = [threading.Thread(target=lambda c=c: answers.append(post(c, {"texts": ["queued", "before sigterm"]}))) for c in connections]
        for sender in senders:
            sender.start()
        wait_for(lambda: samples(url).get("classifier_queue_texts", 0) >= 2 * len(connections), "every text queued")
        process.send_signal(signal.SIGTERM)
        for sender in senders:
            sender.join(BOUND)
        assert process.wait(BOUND) == 0
    assert [status for status, _ in answers] == [200] * len(connections)
    assert all(len(body["results"]) == 2 for _, body in answers)


def test_engine_death_answers_503_and_the_service_exits_non_zero(tiny_model_dir):
    env = {"CLASSIFIER_WORKERS": "2"}
    with run_service(tiny_model_dir, env) as (url, process):
        # The death under test is that of an engine serving every API process, each holding a connection.
        connections_to_each_process(url, process.pid)
        os.kill(engine_process(process.pid), signal.SIGKILL)
        statuses, refusals = [], []

        def refused() -> bool:
            try:
                response = httpx.post(f"{url}/classify", json={"texts": ["anyone there?"]}, timeout=BOUND)
            except httpx.TransportError:
                return True  # the API processes have closed their listener already
            statuses.append(response.status_code)
            if response.status_code == 503:
                refusals.append(response.json()["error"])
            return statuses[-1] == 503

        wait_for(refused, "a 503 or a closed listener")
        assert set(statuses) <= {200, 503}
        # "has stopped" or "shutting down", never "still loading": this replica ends, the client should go elsewhere
        assert all("retry on another replica" in message for message in refusals), refusals
        assert process.wait(BOUND) != 0


def test_one_worker_keeps_a_single_process(tiny_model_dir):
    with run_service(tiny_model_dir, {"CLASSIFIER_WORKERS": "1"}) as (url, process):
        assert children(process.pid) == {} or all(not n.startswith("clf-") for n in children(process.pid).values())
        assert httpx.post(f"{url}/classify", json={"texts": ["fine"]}, timeout=BOUND).status_code == 200


def test_a_model_that_cannot_load_exits_1_with_workers(tmp_path):
    missing = tmp_path / "nowhere"
    port = free_port()
    completed = subprocess.run(
        [sys.executable, "-m", "service", "--port", str(port), "--model", str(missing), "--workers", "2"],
        cwd=ROOT,
        env={**os.environ, "CLASSIFIER_DRAIN_DELAY_SECONDS": "0"},
        capture_output=True,
        text=True,
        timeout=BOUND * 2,
    )
    assert completed.returncode == 1
    assert f"model directory {missing} does not exist" in completed.stderr + completed.stdout


def test_a_second_signal_stops_every_process_at_once_with_status_1(tiny_model_dir):
    env = {"CLASSIFIER_WORKERS": "2", "CLASSIFIER_DRAIN_DELAY_SECONDS": "30", "CLASSIFIER_SHUTDOWN_GRACE_SECONDS": "120"}
    with run_service(tiny_model_dir, env) as (url, process):
        wait_for(lambda: len(api_processes(process.pid)) == 2, "2 API processes")
        processes = [*api_processes(process.pid), engine_process(process.pid)]
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(f"{url}/ready", timeout=BOUND).status_code == 503, "/ready 503 while draining")
        process.send_signal(signal.SIGTERM)
        assert process.wait(BOUND) == 1  # stopped, not drained (a drain exits 0)
        assert not any(Path(f"/proc/{pid}").exists() for pid in processes)
