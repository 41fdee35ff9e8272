"""Start-up tuning in a real service on a tiny model (real measurements in /info and /metrics), the settings that
force or turn it off, reduced precision against fp32, and the HTTP answers for texts that fail alone."""

import asyncio
import time
from types import SimpleNamespace

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from service.api import create_app
from service.runner import ModelRunner
from service.settings import Settings
from service.tuning import BudgetTrial, PrecisionTrial, budget_ladder, choose_budget, choose_precision
from tests.conftest import start_service
from tests.test_api import REVIEWS, _metric, reference_scores

pytestmark = pytest.mark.integration  # service processes or external programs (see pyproject's markers)


def test_info_reports_what_tuning_measured_and_chose(tiny_model_dir):
    with start_service(tiny_model_dir) as url:
        info = httpx.get(f"{url}/info").json()
        budget_metric = _metric(url, "classifier_max_batch_tokens")
        tuning_seconds = _metric(url, "classifier_tuning_seconds")
    tuning = info["tuning"]
    assert tuning["calibration_texts"] == 160
    assert 0 < tuning["seconds"] == pytest.approx(tuning_seconds, abs=0.01)
    precision_trials = [PrecisionTrial(**trial) for trial in tuning["precision_trials"]]
    assert precision_trials[0].precision == "fp32" and precision_trials[0].max_deviation == 0
    assert all(trial.tokens_per_second > 0 for trial in precision_trials)
    assert tuning["precision"]["value"] == info["precision"] == choose_precision(precision_trials, 0.01).value
    budget_trials = [BudgetTrial(**trial) for trial in tuning["budget_trials"]]
    budgets = [trial.budget for trial in budget_trials]
    assert budgets == sorted(set(budgets)) and set(budgets) <= set(budget_ladder(64, "cpu"))
    assert all(trial.tokens_per_second > 0 for trial in budget_trials)
    chosen = choose_budget(budget_trials, floor=64).value
    assert tuning["max_batch_tokens"]["value"] == info["batching"]["max_batch_tokens"] == chosen == budget_metric
    # What live traffic checks starts with the choice; a disturbed measurement says why (a shared machine may be busy).
    assert tuning["live_candidates"]["precision"][0] == info["precision"]
    assert tuning["live_candidates"]["max_batch_tokens"][0] == chosen
    assert all(isinstance(reason, str) for reason in tuning["disturbed"])
    live = info["batching"].get("live_tuning")
    if len(tuning["live_candidates"]["max_batch_tokens"]) > 1:  # alternatives worth a live check: the live section
        assert live["in_force"]["max_batch_tokens"] == chosen and live["switches"] == []
    else:
        assert live is None


def test_tuning_off_keeps_the_per_device_defaults_and_numbers_force_a_budget(tiny_model_dir):
    with start_service(tiny_model_dir, {"CLASSIFIER_TUNE": "false"}) as url:
        info = httpx.get(f"{url}/info").json()
    assert info["tuning"]["enabled"] is False
    assert (info["precision"], info["batching"]["max_batch_tokens"]) == ("fp32", 2048)
    assert "live_tuning" not in info["batching"]
    with start_service(tiny_model_dir, {"CLASSIFIER_MAX_BATCH_TOKENS": "768", "CLASSIFIER_PRECISION": "fp32"}) as url:
        info = httpx.get(f"{url}/info").json()
    assert info["batching"]["max_batch_tokens"] == 768
    assert info["tuning"]["enabled"] is False


def test_a_forced_precision_is_kept_while_the_budget_is_measured(tiny_model_dir):
    with start_service(tiny_model_dir, {"CLASSIFIER_PRECISION": "bf16"}) as url:
        info = httpx.get(f"{url}/info").json()
    assert info["precision"] == "bf16"
    assert info["tuning"]["precision"] == {"value": "bf16", "reason": "forced by CLASSIFIER_PRECISION"}
    assert info["tuning"]["precision_trials"] == [] and info["tuning"]["budget_trials"]
    assert info["tuning"]["live_candidates"]["precision"] == ["bf16"]  # a forced setting is not tuned live either


def test_regression_heads_stay_fp32_under_auto(regression_model_dir):
    with start_service(regression_model_dir) as url:
        info = httpx.get(f"{url}/info").json()
    assert info["precision"] == "fp32"
    assert [trial["precision"] for trial in info["tuning"]["precision_trials"]] == ["fp32"]


# This random tiny model's bf16 scores move up to 0.033 from fp32's on the calibration set (its weights are large
# on purpose); the default model's move 0.005. Batching must not add to that.
BF16_TOLERANCE = 0.05


def test_batching_in_bf16_stays_within_its_tolerance_of_fp32_alone(tiny_model_dir):
    texts = [f"{REVIEWS[i % len(REVIEWS)]} {'very ' * (i * 3 % 25)}{i}" for i in range(32)]
    expected = reference_scores(tiny_model_dir, texts, lambda logits: logits.softmax(-1))
    env = {"CLASSIFIER_BATCH_WINDOW_MS": "50", "CLASSIFIER_PRECISION": "bf16", "CLASSIFIER_MAX_BATCH_TOKENS": "2048"}
    with start_service(tiny_model_dir, env) as url:

        async def send_all() -> list[dict]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                responses = await asyncio.gather(*[client.post("/classify", json={"texts": text}) for text in texts])
            assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
            return [r.json()["results"][0] for r in responses]

        results = asyncio.run(send_all())
        mean_batch = _metric(url, "classifier_batch_size_sum") / _metric(url, "classifier_batch_size_count")
    assert mean_batch > 2, "texts were not batched together, so the test would prove nothing"
    differences = []
    for result, scores in zip(results, expected):
        by_label = {item["label"]: item["score"] for item in result["labels"]}
        differences.append(max(abs(by_label["NEGATIVE"] - scores[0]), abs(by_label["POSITIVE"] - scores[1])))
    assert max(differences) <= BF16_TOLERANCE
    assert max(differences) > 1e-4  # bf16 really ran


class FailingClassifier(torch.nn.Module):
    """A real model that runs out of CUDA memory above `max_tokens` per batch and raises on token id `poison`."""

    def __init__(self, model: torch.nn.Module, max_tokens: int, poison: int) -> None:
        super().__init__()
        self.model, self.max_tokens, self.poison = model, max_tokens, poison

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        if input_ids.numel() > self.max_tokens:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        if (input_ids == self.poison).any():
            raise IndexError("index out of range in self (fake)")
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_texts_that_fail_alone_get_clear_errors_and_the_rest_answers(tiny_model_dir):
    settings = Settings(model=str(tiny_model_dir), tune=False, torch_threads=1)
    app = create_app(settings)
    with TestClient(app) as client:
        slot = app.state.slot
        deadline = time.monotonic() + 60
        while not slot.ready and time.monotonic() < deadline:
            time.sleep(0.05)
        scoring = slot.engine().backend.batcher.model
        runner = scoring.runner
        poison = AutoTokenizer.from_pretrained(tiny_model_dir).convert_tokens_to_ids("boring")
        failing = FailingClassifier(runner.model, max_tokens=40, poison=poison)
        scoring.runner = ModelRunner(failing, runner.device, "fp32", runner.pad_token_id)

        fine = client.post("/classify", json={"texts": ["good film", "bad"]})
        assert fine.status_code == 200, fine.text
        too_large = client.post("/classify", json={"texts": "a long story " * 20})
        assert too_large.status_code == 413
        assert "does not fit in the device's memory even alone" in too_large.json()["error"]
        poisoned = client.post("/classify", json={"texts": "boring"})
        assert poisoned.status_code == 500
        assert poisoned.json()["error"].startswith("the model failed on a text: IndexError")


def test_out_of_time_no_trial_starts_and_the_defaults_stand_with_the_reason(tiny_model_dir):
    env = {"CLASSIFIER_TUNING_TIME_LIMIT": "0.000001", "CLASSIFIER_PRECISION_TOLERANCE": "0"}  # fp32 wins
    with start_service(tiny_model_dir, env) as url:
        tuning = httpx.get(f"{url}/info").json()["tuning"]
    assert tuning["precision"]["value"] == "fp32"
    # The time limit holds: no rung is timed after it, so the default budget stands, and the report says why.
    assert tuning["budget_trials"] == []
    assert tuning["max_batch_tokens"] == {"value": 2048, "reason": "no rung fitted in the time limit: 2048, the default"}
    assert "no budget rung fitted in the time limit" in tuning["disturbed"]
