"""The model's forward pass traced or run operator by operator, alone and beside a Python thread of the same process.

    flock /tmp/bench.lock python -m loadtest.trace_benchmark [--model DIR] [--precision fp32] [--rounds 3]
        [--shapes 1x512,8x64,1x16] [--runs 5] [--threads N]

A service runs Python beside its model in the same process (the event loop parsing and answering requests, the
tokenizer threads), and an eager forward pass takes the interpreter lock back after every operator: each time, a
thread running Python may hold it up to the 5 ms switch interval. For each batch shape, in interleaved rounds, the
median milliseconds of `--runs` forward passes of the same `ModelRunner` traced and eager, alone and while one other
thread runs a pure Python loop, and the ratios eager / traced. A ratio alone near 1 says the trace costs nothing when
nothing else runs; beside the busy thread it says how much of the forward pass was waiting for the lock. It prints
JSON; run it alone (its numbers depend on the machine).
"""

import argparse
import json
import statistics
import threading
import time

import torch

from loadtest.probe import machine
from service.default_model import ensure_default_model
from service.runner import ModelRunner, load_classifier


def busy_python(stop: threading.Event) -> None:
    """Pure Python work holding the interpreter lock, as a thread parsing JSON or building answers would."""
    total = 0
    while not stop.is_set():
        for number in range(1000):
            total += number


def median_ms(runner: ModelRunner, inputs: dict[str, torch.Tensor], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        runner.forward(inputs)
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 1)


def measure(runners: dict[str, ModelRunner], inputs: dict[str, torch.Tensor], runs: int, beside_busy_thread: bool) -> dict[str, float]:
    stop = threading.Event()
    thread = threading.Thread(target=busy_python, args=(stop,), daemon=True)
    if beside_busy_thread:
        thread.start()
    try:
        return {name: median_ms(runner, inputs, runs) for name, runner in runners.items()}
    finally:
        stop.set()
        if beside_busy_thread:
            thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the embedded default model)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shapes", default="1x512,8x64,1x16", help="texts x tokens per batch, comma-separated")
    parser.add_argument("--runs", type=int, default=5, help="forward passes per shape, setting and round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_classifier(args.model or str(ensure_default_model()), torch.device("cpu"))
    pad = loaded.tokenizer.pad_token_id or 0
    runners = {"traced": ModelRunner(loaded.model, torch.device("cpu"), args.precision, pad, trace=True)}
    assert runners["traced"].traced, "the model could not be traced: nothing to compare"
    runners["eager"] = ModelRunner(loaded.model, torch.device("cpu"), args.precision, pad)
    vocabulary = loaded.model.config.vocab_size
    report: dict = {"machine": machine(), "args": vars(args), "shapes": {}}
    for shape in args.shapes.split(","):
        texts, tokens = map(int, shape.split("x"))
        inputs = runners["eager"].collate([[(7 * i + n) % vocabulary for i in range(tokens)] for n in range(texts)], tokens)
        measure(runners, inputs, 2, beside_busy_thread=False)  # warm-up: first runs pay one-time set-up
        rounds = []
        for number in range(args.rounds):
            order = [False, True] if number % 2 == 0 else [True, False]
            measured = {("beside" if busy else "alone"): measure(runners, inputs, args.runs, busy) for busy in order}
            for where in measured.values():
                where["eager_over_traced"] = round(where["eager"] / where["traced"], 2)
            rounds.append(measured)
        report["shapes"][shape] = rounds
        print(shape, json.dumps(rounds), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
