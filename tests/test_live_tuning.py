"""Live tuning: the decisions from made-up batch figures on an injected clock (pure), and the batcher carrying them
out in process with a fake model whose speed per precision changes (a neighbour's job stopping)."""

import asyncio
import itertools
import logging
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import REGISTRY

from service.batcher import Batcher
from service.drain_rate import DrainRate
from service.live_tuning import (
    CHECK_TEXTS,
    EXPLORE_EVERY,
    HOLD_SECONDS,
    MIN_PAIRS,
    RETRY_SECONDS,
    SUSTAINED_SECONDS,
    Arm,
    LiveTuner,
    LiveTuning,
    length_class,
    median_lower_bound,
)
from service.postprocess import score_differences
from service.scheduler import BatchingPolicy, BatchQueue
from tests.fakes import WAIT, FakeClock, FakeModel

FP32, BF16 = Arm("fp32", 2048), Arm("bf16", 2048)


class Traffic:
    """Drives a LiveTuner as the batcher would under sustained load: each batch of 2048 real tokens padded to 128
    runs with the arm the tuner chose, at tokens/s given per arm (and per batch: `noise` cycles factors), and the
    clock moves by the batch's time."""

    def __init__(self, tuner: LiveTuner, now: float = 0.0, noise: tuple[float, ...] = (1.0,)) -> None:
        self.tuner, self.now = tuner, now
        self.noise = itertools.cycle(noise)
        self.ran: list[Arm] = []

    def batches(self, count: int, speeds: dict[Arm, float], waiting: bool = True) -> list:
        switches = []
        for _ in range(count):
            arm = self.tuner.choose(self.now, waiting)
            self.tuner.taken(arm)
            seconds = 2048 / (speeds[arm] * next(self.noise))
            self.now += seconds
            self.ran.append(arm)
            if (switch := self.tuner.ran(arm, 2048, 128, seconds, self.now)) is not None:
                switches.append(switch)
        return switches


def test_nothing_is_explored_at_low_load():
    tuner = LiveTuner(FP32, ["fp32", "bf16"], [2048, 4096], now=0.0)
    traffic = Traffic(tuner)
    assert traffic.batches(500, {FP32: 10_000.0}, waiting=False) == []
    assert set(traffic.ran) == {FP32}


def test_exploration_starts_once_load_is_sustained_and_costs_one_batch_in_explore_every():
    tuner = LiveTuner(FP32, ["fp32", "bf16"], [2048], now=0.0)
    traffic = Traffic(tuner)
    speeds = {FP32: 10_000.0, BF16: 10_000.0}
    traffic.batches(5, speeds)  # 1 s of load: not sustained yet
    assert set(traffic.ran) == {FP32}
    traffic.batches(200, speeds)
    explored = traffic.ran.count(BF16)
    assert traffic.now > SUSTAINED_SECONDS
    assert 200 // EXPLORE_EVERY - 2 <= explored <= 200 // EXPLORE_EVERY


def test_a_clearly_faster_alternative_is_put_in_force_once_and_never_flip_flops():
    tuner = LiveTuner(FP32, ["fp32", "bf16"], [2048], now=0.0)
    # A busy machine: each batch's speed varies by up to 30% either way, whichever arm runs it.
    traffic = Traffic(tuner, noise=(1.0, 0.7, 1.3, 0.85, 1.15, 0.75))
    speeds = {FP32: 11_000.0, BF16: 26_000.0}
    switches = traffic.batches(3000, speeds)
    assert [(switch.what, switch.old, switch.new) for switch in switches] == [("precision", FP32, BF16)]
    assert switches[0].median_ratio > 1.5 and switches[0].pairs >= MIN_PAIRS
    assert tuner.in_force == BF16
    info = tuner.info(now=traffic.now, wall_now=1_000_000.0)
    assert info["in_force"] == {"precision": "bf16", "max_batch_tokens": 2048, "since": round(1_000_000.0 - (traffic.now - switches[0].at), 3)}
    assert info["switches"][0]["from"] == "fp32/2048" and info["switches"][0]["to"] == "bf16/2048"
    assert info["candidates"]["fp32/2048"]["retired"]  # the slower one, tried against bf16, is left alone a while
    # After the switch, fp32 is explored only until it is shown slower, then again after RETRY_SECONDS.
    after = traffic.ran[traffic.ran.index(BF16, len(traffic.ran) - 2000) :]
    assert after.count(FP32) < len(after) / EXPLORE_EVERY


def test_an_alternative_within_the_margin_is_never_put_in_force():
    tuner = LiveTuner(FP32, ["fp32", "bf16"], [2048], now=0.0)
    traffic = Traffic(tuner, noise=(1.0, 0.8, 1.2))
    assert traffic.batches(5000, {FP32: 10_000.0, BF16: 10_500.0}) == []  # 5% faster: within the noise margin
    assert tuner.in_force == FP32


def test_a_slower_alternative_is_retired_and_explored_again_later():
    tuner = LiveTuner(FP32, ["fp32", "bf16"], [2048], now=0.0)
    traffic = Traffic(tuner)
    speeds = {FP32: 10_000.0, BF16: 5_000.0}
    traffic.batches(int(SUSTAINED_SECONDS * 5) + (MIN_PAIRS + 1) * EXPLORE_EVERY, speeds)
    assert traffic.ran.count(BF16) == MIN_PAIRS
    explored = traffic.ran.count(BF16)
    traffic.batches(int(RETRY_SECONDS * 5) - 200, speeds)  # 0.2 s batches: not yet RETRY_SECONDS later
    assert traffic.ran.count(BF16) == explored
    traffic.batches(400, speeds)
    assert traffic.ran.count(BF16) > explored


def test_the_budget_is_tuned_live_like_the_precision_and_no_switch_follows_within_the_hold():
    small, large = Arm("fp32", 2048), Arm("fp32", 4096)
    tuner = LiveTuner(small, ["fp32"], [2048, 4096], now=0.0)
    traffic = Traffic(tuner)
    switches = traffic.batches(2000, {small: 10_000.0, large: 12_000.0})
    assert [(switch.what, switch.new) for switch in switches] == [("budget", large)]
    # The machine changes: the small budget is now much faster; it may come back, but only after the hold.
    later = traffic.batches(3000, {small: 20_000.0, large: 12_000.0})
    assert [switch.new for switch in later] == [small]
    assert later[0].at - switches[0].at >= HOLD_SECONDS


def test_batches_are_paired_only_within_their_length_class():
    assert length_class(128) == length_class(100) != length_class(129)
    tuner = LiveTuner(FP32, ["fp32", "bf16"], [2048], now=0.0)
    tuner.ran(FP32, 2000, 128, 0.2, now=1.0)
    tuner.ran(BF16, 2000, 512, 0.1, now=1.1)  # no in-force batch of its length class to pair with
    tuner.ran(BF16, 2000, 100, 0.1, now=1.2)
    assert tuner.info(now=1.2, wall_now=0.0)["candidates"]["bf16/2048"]["pairs"] == 1


def compare_raw(answered: list[list[float]], shadow: list[list[float]]) -> tuple[float, int]:
    """The fake model's scores compared as they are (a regression head's activation)."""
    return score_differences(answered, shadow, "regression")


def switches_counted(what: str) -> float:
    return REGISTRY.get_sample_value("classifier_tuning_switches_total", {"what": what}) or 0.0


def test_the_batcher_switches_precision_when_the_neighbour_stops(caplog):
    """Start-up chose fp32 while a neighbour slowed bf16 to fp32's speed; once it stops, bf16 is 2.3x faster: the
    batcher explores it on live batches, switches once (logged, counted, in /info's section), and stays."""
    policy = BatchingPolicy(bucket_bounds=(16,), max_batch_tokens=128, max_batch_size=8, window=0.0)
    seconds_per_token = {"fp32": 0.01, "bf16": 0.01}  # 1.28 s per batch of 8 texts x 16 tokens

    async def main():
        clock = FakeClock()
        model = FakeModel(clock, seconds_per_token=seconds_per_token)
        tuner = LiveTuner(Arm("fp32", 128), ["fp32", "bf16"], [128], now=clock())
        batcher = Batcher(
            BatchQueue(policy),
            model,
            max_queue_tokens=10_000_000,
            rates=DrainRate(),
            clock=clock,
            live=LiveTuning(tuner, model.use_precision, compare_raw),
        )
        counted = switches_counted("precision")
        with ThreadPoolExecutor(1) as inference_thread:
            batcher.start(inference_thread)
            try:
                names = itertools.count(1)
                wave = batcher.submit([[next(names)] * 16 for _ in range(8 * 80)])
                answers = await asyncio.wait_for(asyncio.gather(*wave.futures), WAIT)
                assert [answer[1] for answer in answers] == [float(item.handle.ids[0]) for item in wave.items]
                assert tuner.switches == [] and "bf16" in model.precisions  # explored, equal: nothing to gain
                seconds_per_token["bf16"] = 0.01 / 2.3  # the neighbour stopped
                wave = batcher.submit([[next(names)] * 16 for _ in range(8 * 600)])
                await asyncio.wait_for(asyncio.gather(*wave.futures), WAIT)
            finally:
                batcher.drain()
                await asyncio.wait_for(batcher.drained(), WAIT)
        return batcher, tuner, model, counted

    with caplog.at_level(logging.WARNING, logger="service.batcher"):
        batcher, tuner, model, counted = asyncio.run(main())
    assert [(switch.old.precision, switch.new.precision) for switch in tuner.switches] == [("fp32", "bf16")]
    assert switches_counted("precision") == counted + 1
    assert any("live tuning: precision fp32/128 -> bf16/128" in record.getMessage() for record in caplog.records)
    assert model.precisions[-1] == "bf16"
    assert model.precisions[-20:].count("bf16") >= 18  # fp32 explored at most now and then
    live = batcher.live_info()
    assert live is not None and live["in_force"]["precision"] == "bf16"
    assert live["candidates"]["bf16/128"]["tokens_per_second"] > live["candidates"]["fp32/128"]["tokens_per_second"]
    gauge = REGISTRY.get_sample_value("classifier_live_tokens_per_second", {"precision": "bf16", "budget": "128"})
    assert gauge == pytest.approx(live["candidates"]["bf16/128"]["tokens_per_second"], abs=0.1)


def test_equal_settings_on_a_noisy_machine_never_switch():
    """Two minutes and more of steady saturation where every setting is equally fast, each batch off by up to 35%
    either way at random: noise alone never puts an alternative in force."""
    rng = random.Random(7)
    small, large = Arm("fp32", 4096), Arm("fp32", 1024)
    tuner = LiveTuner(FP32, ["fp32", "bf16"], [1024, 2048, 4096], now=0.0)
    traffic = Traffic(tuner, noise=tuple(rng.uniform(0.65, 1.35) for _ in range(1009)))
    switches = traffic.batches(20_000, {FP32: 10_000.0, BF16: 10_000.0, small: 10_000.0, large: 10_000.0})
    assert traffic.now > 120 and switches == []
    assert {BF16, small, large} <= set(traffic.ran)  # all were explored


@pytest.mark.parametrize("seed", range(10))
def test_a_quiet_start_s_choice_under_steady_saturation_switches_at_most_once_and_never_to_a_slower_one(seed):
    """A quiet start chose bf16/2048; live, under two minutes and more of steady saturation, each batch off by up to
    35% either way at random: the neighbouring budgets are within a few percent (one slower, one faster) and fp32 is
    less than half as fast. At most one switch, and only to a setting at least as fast as the one it replaces."""
    rng = random.Random(seed)
    chosen, smaller, larger = Arm("bf16", 2048), Arm("bf16", 1024), Arm("bf16", 4096)
    fp32 = Arm("fp32", 2048)
    speeds = {chosen: 26_000.0, smaller: 25_200.0, larger: 26_600.0, fp32: 11_000.0}
    tuner = LiveTuner(chosen, ["bf16", "fp32"], [2048, 1024, 4096], now=0.0)
    traffic = Traffic(tuner, noise=tuple(rng.uniform(0.65, 1.35) for _ in range(1009)))
    # What the arms one switch away from the in-force setting run at once it moved (fp32 with the other budgets).
    speeds |= {Arm("fp32", 1024): 10_500.0, Arm("fp32", 4096): 11_200.0}
    switches = traffic.batches(2_000, speeds)
    assert traffic.now > 150
    assert len(switches) <= 1
    assert all(speeds[switch.new] >= speeds[switch.old] for switch in switches)
    assert tuner.in_force.precision == "bf16"


def test_the_median_lower_bound_is_an_order_statistic_that_widens_with_fewer_pairs():
    assert median_lower_bound([1.5] * 11 + [0.5]) == 0.5  # of 12: the smallest
    assert median_lower_bound([0.5] * 4 + [1.5] * 20) == 1.5  # of 24: the fifth smallest
    assert median_lower_bound([0.5] * 11 + [1.5] * 29) == 0.5  # of 40: the eleventh smallest
    assert median_lower_bound([0.5] * 10 + [1.5] * 30) == 1.5


def shadow_batches(tuner: LiveTuner, count: int, seconds: dict[Arm, float], deviation: float = 0.0, now: float = 0.0) -> tuple[list, list, float]:
    """Drives a LiveTuner as the batcher would under sustained load, where a shadowed choice runs in the setting in
    force and then in the chosen arm: batches of 16 texts, 2048 real tokens padded to 128, taking `seconds` per arm,
    each shadow run's scores off by `deviation`. Returns the log lines and switches, and the clock at the end."""
    messages, switches = [], []
    for _ in range(count):
        arm = tuner.choose(now, True)
        tuner.taken(arm)
        ran = tuner.in_force if tuner.shadowed(arm) else arm
        now += seconds[ran]
        switch = tuner.ran(ran, 2048, 128, seconds[ran], now)
        if ran != arm:
            now += seconds[arm]
            message, switch = tuner.checked(arm, 16, deviation, 0, 2048, 128, seconds[ran], seconds[arm], now)
            messages += [message] if message else []
        switches += [switch] if switch else []
    return messages, switches, now


def test_a_precision_start_up_could_not_check_is_checked_on_shadow_runs_then_put_in_force():
    """A busy start had no time to compare bf16's scores with fp32's: under sustained load bf16 runs only as a shadow
    of batches answered in fp32, taking every exploration turn before the other budget's, until CHECK_TEXTS texts
    agreed and MIN_PAIRS shadow runs timed it against the same batches in fp32; 2.3x faster, it is put in force then,
    once."""
    larger = Arm("fp32", 4096)
    tuner = LiveTuner(FP32, ["fp32"], [2048, 4096], now=0.0, unchecked=["bf16"], tolerance=0.01)
    assert tuner.exploring and tuner.alternatives() == [BF16, larger] and tuner.shadowed(BF16)
    assert [tuner.choose(float(t), False) for t in range(100)] == [FP32] * 100  # low load: nothing is checked
    seconds, now, shadows = {FP32: 0.23, BF16: 0.1, larger: 0.46, Arm("bf16", 4096): 0.2}, 0.0, 0
    while tuner.shadowed(BF16):
        assert tuner.in_force == FP32
        messages, switches, now = shadow_batches(tuner, 1, seconds, deviation=0.004, now=now)
        shadows = tuner.info(now, now)["candidates"].get("bf16/2048", {"batches": 0})["batches"]
    assert shadows == MIN_PAIRS and tuner.info(now, now)["candidates"]["fp32/4096"]["batches"] == 0  # no budget explored yet
    assert messages == [
        f"live tuning: bf16 passed its check against fp32 on {MIN_PAIRS * 16} live texts, largest score difference 0.0040, "
        "0 top-1 labels changed: explored from now on"
    ]
    assert not tuner.unchecked and tuner.precisions == ["fp32", "bf16"]
    assert [(switch.old, switch.new, switch.pairs) for switch in switches] == [(FP32, BF16, MIN_PAIRS)]
    _, switches, _ = shadow_batches(tuner, 2_000, seconds, now=now)
    assert switches == [] and tuner.in_force == BF16  # and never back


@pytest.mark.parametrize(("deviation", "label_changes"), [(0.02, 0), (0.0, 1)])
def test_a_precision_whose_live_scores_differ_is_rejected_and_never_explored(deviation, label_changes):
    tuner = LiveTuner(FP32, ["fp32"], [2048, 4096], now=0.0, unchecked=["bf16"], tolerance=0.01)
    message, switch = tuner.checked(BF16, 16, 0.001, 0, 2048, 128, 0.2, 0.1, now=1.0)
    assert message is None and switch is None
    message, switch = tuner.checked(BF16, 16, deviation, label_changes, 2048, 128, 0.2, 0.1, now=2.0)
    assert switch is None and message is not None and message.startswith("live tuning: bf16 rejected against fp32 on 32 live texts")
    assert tuner.rejected == {"bf16": tuner.info(3.0, 3.0)["rejected"]["bf16"]} and "bf16" not in tuner.info(3.0, 3.0)["checking"]
    assert tuner.alternatives() == [Arm("fp32", 4096)] and not tuner.shadowed(BF16)
    _, switches, _ = shadow_batches(tuner, 2_000, {FP32: 0.2, BF16: 0.1, Arm("fp32", 4096): 0.4})
    assert switches == [] and tuner.in_force == FP32


@pytest.mark.parametrize("offset", [0.001, 0.05])
def test_the_batcher_answers_in_the_setting_in_force_while_it_checks_a_precision_in_shadow(offset, caplog):
    """The batcher carries a check out: every shadowed batch runs in fp32, answered, then again in bf16; bf16 within
    the tolerance (its scores off by 0.001) is put in force once checked and 2.3x faster; off by 0.05, it is
    rejected, and every answer stays fp32's."""
    policy = BatchingPolicy(bucket_bounds=(16,), max_batch_tokens=128, max_batch_size=8, window=0.0)

    async def main():
        clock = FakeClock()
        model = FakeModel(clock, seconds_per_token={"fp32": 0.01, "bf16": 0.01 / 2.3}, score_offsets={"bf16": offset})
        tuner = LiveTuner(Arm("fp32", 128), ["fp32"], [128], now=clock(), unchecked=["bf16"], tolerance=0.01)
        live = LiveTuning(tuner, model.use_precision, compare_raw)
        batcher = Batcher(BatchQueue(policy), model, max_queue_tokens=10_000_000, rates=DrainRate(), clock=clock, live=live)
        with ThreadPoolExecutor(1) as inference_thread:
            batcher.start(inference_thread)
            try:
                wave = batcher.submit([[n] * 16 for n in range(1, 8 * 600)])
                answers = await asyncio.wait_for(asyncio.gather(*wave.futures), WAIT)
            finally:
                batcher.drain()
                await asyncio.wait_for(batcher.drained(), WAIT)
        return batcher, tuner, model, answers

    with caplog.at_level(logging.WARNING, logger="service.batcher"):
        batcher, tuner, model, answers = asyncio.run(main())
    ran = list(zip(model.precisions, model.ran))
    shadows = [index for index, (precision, _) in enumerate(ran) if precision == "bf16"][: CHECK_TEXTS // 8 if offset < 0.01 else None]
    assert shadows and all(ran[index - 1] == ("fp32", ran[index][1]) for index in shadows)  # the same batch, answered in fp32 first
    live = batcher.live_info()
    assert live is not None and live["checking"] == {}
    if offset < 0.01:
        assert [(switch.old.precision, switch.new.precision) for switch in tuner.switches] == [("fp32", "bf16")]
        assert any("bf16 passed its check against fp32" in record.getMessage() for record in caplog.records)
        assert live["in_force"]["precision"] == "bf16" and model.precisions[-1] == "bf16"
        first_bf16_answer = next(index for index, answer in enumerate(answers) if answer[0] != 16.0)
        assert first_bf16_answer >= 8 * EXPLORE_EVERY * (CHECK_TEXTS // 8 - 1)  # nothing answered in bf16 before its check
    else:
        assert tuner.switches == [] and live["rejected"]["bf16"].startswith("8 live texts")
        assert any("bf16 rejected against fp32" in record.getMessage() for record in caplog.records)
        assert all(answer[0] == 16.0 for answer in answers)
        assert len(shadows) == 1  # one shadow run, then never again


def test_another_precision_is_explored_before_the_budgets_until_judged_once():
    """A busy start chose fp32 with bf16 faithful beside it and two neighbouring budgets: bf16, the large difference,
    takes every exploration turn until its first checkpoint (in turns with the budgets, three times as many batches),
    and is put in force there; then the budgets are explored in turn."""
    smaller, larger = Arm("fp32", 1024), Arm("fp32", 2048 * 2)
    tuner = LiveTuner(FP32, ["fp32", "bf16"], [2048, 1024, 4096], now=0.0)
    traffic = Traffic(tuner)
    speeds = {FP32: 5_000.0, BF16: 8_500.0, smaller: 5_000.0, larger: 5_000.0, Arm("bf16", 1024): 8_400.0, Arm("bf16", 4096): 8_400.0}
    switches = []
    while not switches:
        switches = traffic.batches(1, speeds)
    assert [(switch.old, switch.new, switch.pairs) for switch in switches] == [(FP32, BF16, MIN_PAIRS)]
    explored = [arm for arm in traffic.ran if arm != FP32]
    assert explored == [BF16] * MIN_PAIRS
    assert len(traffic.ran) <= EXPLORE_EVERY * MIN_PAIRS + 10  # the first few batches wait for load to be sustained
    traffic.batches(200, speeds)
    assert {Arm("bf16", 1024), Arm("bf16", 4096)} <= set(traffic.ran)  # the budgets' turn came
