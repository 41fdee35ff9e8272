"""Locust workload for the classifier service: real texts (loadtest/corpus.py) in two kinds of request.

- SingleTextUser: an interactive client classifying one text per request.
- BatchUser: a pipeline sending several texts per request (2 to --batch-size).
Their mix is set with --single-weight and --batch-weight (0 leaves a kind out). Run it through
`python -m loadtest.run_locust`, which adds the server-side summary and the pass/fail gate, or directly from the
repository root: `PYTHONPATH=. locust -f loadtest/locustfile.py --host http://127.0.0.1:8000`.
"""

import json
import random

from locust import FastHttpUser, between, events, task

from loadtest.corpus import load_texts

TEXTS = load_texts()


@events.init_command_line_parser.add_listener
def _add_options(parser):
    parser.add_argument(
        "--single-weight",
        type=int,
        default=3,
        env_var="LOCUST_SINGLE_WEIGHT",
        help="relative share of single-text users (default 3)",
    )
    parser.add_argument(
        "--batch-weight",
        type=int,
        default=1,
        env_var="LOCUST_BATCH_WEIGHT",
        help="relative share of multi-text users (default 1)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        env_var="LOCUST_BATCH_SIZE",
        help="most texts in one multi-text request (default 16)",
    )
    parser.add_argument("--summary-json", help="write the final client-side numbers to this file")


@events.init.add_listener
def _apply_weights(environment, **_):
    options = environment.parsed_options
    if options is None:  # locust used as a library: keep the class defaults
        return
    SingleTextUser.weight, BatchUser.weight = options.single_weight, options.batch_weight
    BatchUser.max_texts = max(2, options.batch_size)
    # Locust drops weight-0 classes only when it builds the environment, which has happened by now.
    environment.user_classes[:] = [user for user in environment.user_classes if user.weight > 0]
    if not environment.user_classes:
        raise ValueError("--single-weight and --batch-weight cannot both be 0")
    if options.summary_json:
        events.quit.add_listener(lambda **_: _write_summary(environment, options.summary_json))


def _write_summary(environment, path: str) -> None:
    # Locust's --csv files miss the last second or so of a headless run (locust issues #1806, #2299);
    # `quit` fires after every user has stopped, so these numbers are final.
    stats = environment.runner.stats
    entries = [*stats.entries.values(), stats.total]  # stats.total is named "Aggregated"
    summary = {
        entry.name: {
            "requests": entry.num_requests,
            "failures": entry.num_failures,
            "requests_per_second": entry.total_rps,
            **{f"p{p}_ms": entry.get_response_time_percentile(p / 100) for p in (50, 90, 99)},
            "max_ms": entry.max_response_time,
        }
        for entry in entries
    }
    with open(path, "w") as file:
        json.dump(summary, file, indent=2)


class ClassifierUser(FastHttpUser):
    abstract = True

    def classify(self, texts: list[str], name: str) -> None:
        with self.client.post("/classify", json={"texts": texts}, name=name, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            elif len(response.json().get("results", [])) != len(texts):
                response.failure(f"{len(texts)} texts sent, a different number of results received")


class SingleTextUser(ClassifierUser):
    weight = 3
    wait_time = between(0.05, 0.5)

    @task
    def one_text(self):
        self.classify([random.choice(TEXTS)], "/classify [1 text]")


class BatchUser(ClassifierUser):
    weight = 1
    max_texts = 16
    wait_time = between(0.2, 1.0)

    @task
    def several_texts(self):
        self.classify(random.sample(TEXTS, random.randint(2, self.max_texts)), "/classify [batch]")
