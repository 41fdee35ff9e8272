"""Runs the queue: admits encoded texts from the event loop, builds each batch's inputs on a collation thread,
runs batches on the one inference thread, and resolves every caller's future with its own scores.

Here, three parts with one job each: `Batcher` keeps the queue and what left it (one lock guards both) and answers
the event loop's `submit`, `cancel` and `drain`; `BatchThreads` are the two threads that collate and run batches;
`Answers` hands outcomes back to the callers' futures on the event loop. The rest lives apart: batching and the one
deadline decision in `scheduler`, admission in `admission`, the drain-rate estimate they read in `drain_rate`,
running a batch (splitting it on failure, the memory budget) in `splitting`, what batches report to Prometheus
in `batch_metrics`, and which setting (precision, budget) a batch runs with under live tuning in `live_tuning` (the
batcher only carries it out: `_next_batch`, `run_with`, `_live_ran`).
"""

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from queue import Queue
from typing import Any

from service import batch_metrics, metrics
from service.admission import Backlog, Refusal, admit, seconds_ahead
from service.callers import class_of
from service.drain_rate import DrainRate
from service.errors import DeadlineExceeded, NotAccepting, Overloaded
from service.fairness import Usage
from service.live_tuning import Arm, LiveTuning, Switch
from service.scheduler import Batch, BatchQueue, QueuedText, deadline_passed, missed_deadlines
from service.splitting import BatchModel, Scores, SplittingRunner
from service.thread_names import name_this_thread

log = logging.getLogger(__name__)

# Admissions publish the queue's state (three gauges, each a write to a shared file under --workers) this long after
# the first of them, once for all that come meanwhile, not once each; batches taken and ended publish it at once.
QUEUE_STATE_DELAY = 0.01


@dataclass(slots=True)
class Pending:
    """The caller's side of a queued text: its token ids, the future its scores go to, when admission predicted its
    answer, and, if it opened a batch of its own, its plain predicted wait (None when it joined a queued batch)."""

    ids: list[int]
    future: asyncio.Future
    answer_at: float
    opening_wait: float | None


@dataclass(frozen=True, slots=True)
class Collated:
    """A batch taken from the queue and its inputs, built on the collation thread (None when that failed), when it
    was taken, whether texts were still queued behind it, and with live tuning, the setting it runs with and the one
    it runs again in as a shadow, once answered (`LiveTuner.shadowed`)."""

    batch: Batch
    inputs: Any
    taken_at: float
    more_queued: bool
    arm: Arm | None = None
    shadow: Arm | None = None


@dataclass(frozen=True, slots=True)
class Submission:
    """One request's queued texts, in order: await their futures, or `Batcher.cancel` them."""

    items: list[QueuedText]

    @property
    def futures(self) -> list[asyncio.Future]:
        return [item.handle.future for item in self.items]


class InFlight:
    """The texts that have left the queue unanswered: those of the batch collated while another runs, waiting their
    turn (still cancellable), and the batch running now (its real tokens and start; 0 tokens when none runs). A
    batch taken while the inference thread is idle counts as running at once, as it did before collation had its
    own thread. The batcher's lock guards it."""

    def __init__(self) -> None:
        self._waiting: list[QueuedText] = []
        self._waiting_tokens = 0  # theirs, summed once per change rather than at every admission
        self._inference_idle = True
        self._running: tuple[int, float] = (0, 0.0)

    def taken(self, batch: Batch) -> None:
        self._set_waiting([] if self._inference_idle else list(batch.items))

    def withdraw(self, items: list[QueuedText]) -> list[QueuedText]:
        """Remove those of `items` waiting to run, and return them."""
        if not self._waiting:
            return []
        wanted = {id(item) for item in items}
        withdrawn = [item for item in self._waiting if id(item) in wanted]
        if withdrawn:
            self._set_waiting([item for item in self._waiting if id(item) not in wanted])
        return withdrawn

    def started(self, items: list[QueuedText], now: float) -> None:
        self._set_waiting([])
        self._inference_idle = False
        self._running = (sum(item.tokens for item in items), now)

    def ended(self) -> None:
        self._running, self._inference_idle = (0, 0.0), True

    @property
    def running(self) -> bool:
        """Whether the inference thread is running a batch."""
        return not self._inference_idle

    def backlog(self, queued_tokens: int, now: float) -> Backlog:
        """The work ahead of a new text: the queue's tokens, those waiting to run, and the batch running now."""
        running_tokens, running_since = self._running
        return Backlog(queued_tokens + self.waiting_tokens(), running_tokens, now - running_since)

    def waiting_tokens(self) -> int:
        return self._waiting_tokens

    def _set_waiting(self, items: list[QueuedText]) -> None:
        self._waiting = items
        self._waiting_tokens = sum(item.tokens for item in items)


class Batcher:
    """Keeps the queue: `submit` texts from the event loop, `cancel` them, `drain`; from `start` on, `BatchThreads`
    take batches from it and run them back to back on one inference thread. One lock guards the queue, what has left
    it (`InFlight`) and the drain rate admission reads.
    """

    def __init__(
        self,
        queue: BatchQueue,
        model: BatchModel,
        max_queue_tokens: int,
        rates: DrainRate,
        clock: Callable[[], float] = time.monotonic,
        live: LiveTuning | None = None,
        fair_share_headroom: float = 0.0,
        shared_batch_seconds: float = 0.0,
    ) -> None:
        self.queue = queue
        self.model = model
        self.max_queue_tokens = max_queue_tokens
        self.fair_share_headroom = fair_share_headroom  # beyond max_queue_tokens, for callers under their share
        self.shared_batch_seconds = shared_batch_seconds  # how long a batch may run while callers share; 0 = any
        self.rates = rates
        self.clock = clock
        self.splitter = SplittingRunner(model, queue.policy, self.set_budget, clock)
        self.live = live  # live tuning: its tuner is guarded by the lock
        self.answers: Answers | None = None  # from `start`
        self._in_flight = InFlight()
        self._changed = threading.Condition()
        self._accepting = True
        self._queue_state_due = False  # admissions have changed the queue and its state is to be published
        self._admitted: dict[str, int] = {}  # texts admitted per caller since the last `publish_admitted`
        self._worked: asyncio.Future | None = None

    def start(self, inference_thread: Executor) -> None:
        """Run batches on `inference_thread` (a one-thread executor) until drained; futures resolve on this loop."""
        self.answers = Answers(asyncio.get_running_loop(), self.clock, self.rates)
        self._worked = BatchThreads(self, self.answers).start(inference_thread)

    def submit(self, texts: list[list[int]], deadline: float = math.inf, caller: str = "") -> Submission:
        """Queue `caller`'s texts (token ids), to be answered by `deadline` (on this batcher's clock); one future per
        text.

        Raises NotAccepting while draining, DeadlineExceeded when the deadline has already passed, and Overloaded
        when the queue is full (for this caller: over its fair share, or past the headroom) or these texts' predicted
        answer would come after the deadline (`admission` decides, counting the batch running now, the queued batches
        texts join or wait behind, as far as the fair share puts them ahead, and how far real waits have strayed from
        the plain prediction).
        """
        with self._changed:
            now = self.clock()
            if not self._accepting:
                raise NotAccepting()
            if deadline_passed(deadline, now):
                raise DeadlineExceeded()
            waiting_tokens = self._in_flight.waiting_tokens()  # collated, waiting for the running batch
            places = [self.queue.place(len(ids), caller) for ids in texts]
            own_tokens = sum(len(ids) for ids in texts)
            queued = self.queue.usage(caller)
            admitted = admit(
                now,
                self._in_flight.backlog(self.queue.tokens_ahead_of(caller, own_tokens), now),
                own_tokens,
                [place.tokens_ahead + waiting_tokens for place in places],
                [None if place.follows is None else place.follows.handle.answer_at for place in places],
                deadline - now,
                self.max_queue_tokens,
                self.rates,
                Usage(queued.total + waiting_tokens, queued.caller, queued.active_callers),
                self.fair_share_headroom,
            )
            if isinstance(admitted, Refusal):
                metrics.REJECTED_TEXTS.labels(admitted.reason).inc(len(texts))
                if admitted.reason == "fair_share":
                    metrics.FAIR_SHARE_REFUSALS.labels("queue", class_of(caller)).inc()
                raise Overloaded(admitted.reason, admitted.message, admitted.retry_after)
            answers = self.answers
            assert answers is not None, "submit before start"
            items = [
                QueuedText(len(ids), now, Pending(ids, answers.future(), text.answer_at, text.opening_wait), deadline, caller)
                for ids, text in zip(texts, admitted)
            ]
            for item in items:
                self.queue.append(item)
            self._admitted[caller] = self._admitted.get(caller, 0) + len(items)
            self._changed.notify()
        if not self._queue_state_due:  # once per QUEUE_STATE_DELAY, however many requests come in it
            self._queue_state_due = True
            answers.call_later(QUEUE_STATE_DELAY, self.publish_admitted)
        return Submission(items)

    def publish_admitted(self) -> None:
        """Publish the queue's state and count the texts admitted (the event loop calls it QUEUE_STATE_DELAY after
        the first admission since the last time: a metric written per request cost a twentieth of the engine's
        event loop per request)."""
        with self._changed:
            self._queue_state_due = False
            admitted, self._admitted = self._admitted, {}
            self._publish_queue_state()
        by_class: dict[str, int] = {}
        for caller, texts in admitted.items():
            caller_class = class_of(caller)
            by_class[caller_class] = by_class.get(caller_class, 0) + texts
        for caller_class, texts in by_class.items():
            metrics.ADMITTED_TEXTS.labels(caller_class).inc(texts)

    def cancel(self, submission: Submission, reason: str) -> int:
        """Drop the submission's texts still queued or in the batch waiting to run (`reason`: client_gone, deadline),
        so the model never runs them, and cancel their futures. Texts already in a running batch are left to finish.
        Returns how many were dropped.
        """
        with self._changed:
            removed = self.queue.remove(submission.items) + self._in_flight.withdraw(submission.items)
            if removed:
                if reason == "deadline":
                    self._count_missed(removed, self.clock())
                else:
                    metrics.CANCELLED_TEXTS.labels(reason).inc(len(removed))
                self._publish_queue_state()
        for item in removed:
            item.handle.future.cancel()
        return len(removed)

    def together(self) -> contextlib.AbstractContextManager:
        """The lock `submit` and `cancel` take, to hold around several of them from the event loop: taken once, it
        spares each the wait for the batch threads (and then for the interpreter lock) that contention costs. It is
        re-entrant, so each call still takes it, from this same thread, at no cost."""
        return self._changed

    @property
    def accepting(self) -> bool:
        """Whether `submit` admits texts (false once draining)."""
        return self._accepting

    def drain(self) -> None:
        """Stop admitting; the inference thread finishes every text already queued, then ends."""
        with self._changed:
            self._accepting = False
            self._changed.notify()

    async def drained(self) -> None:
        """Wait until the batch threads have ended (at once if they never started)."""
        if self._worked is not None:
            await self._worked

    def take_batch(self) -> tuple[Batch, bool, Arm | None, Arm | None] | None:
        """Wait until the scheduler hands out a batch, and say whether texts are still queued behind it and (with
        live tuning) the setting it runs with and the one it runs again in as a shadow; None once draining has emptied
        the queue. Texts whose deadline passed while queued are failed on the way."""
        with self._changed:
            while True:
                now = self.clock()
                if missed := self.queue.remove_missed_deadlines(now):
                    self._count_missed(missed, now)
                    self._publish_queue_state()
                    self._loop_answers().fail(missed, DeadlineExceeded())
                if self._in_flight.running and self.shared_batch_seconds and self.queue.sharing(now):
                    # While callers share the model, the next batch is chosen as the running one ends rather than
                    # as it starts, so a text arriving meanwhile can join it instead of waiting one more batch.
                    self._changed.wait(self.shared_batch_seconds)
                    continue
                batch, arm = self._next_batch(now)
                if batch is not None:
                    self._in_flight.taken(batch)
                    shadow = None
                    if arm is not None and self.live is not None:
                        self.live.tuner.taken(arm)
                        if self.live.tuner.shadowed(arm):  # answered in the setting in force, then run in `arm`
                            arm, shadow = self.live.tuner.in_force, arm
                    self._publish_queue_state()
                    return batch, len(self.queue) > 0, arm, shadow
                if not self._accepting and not len(self.queue):
                    return None
                wake_at = self.queue.wake_at()
                self._changed.wait(None if wake_at is None else max(0.0, wake_at - self.clock()))

    def _next_batch(self, now: float) -> tuple[Batch | None, Arm | None]:
        """The scheduler's next batch and, with live tuning, the setting it runs with: under sustained load now and
        then an alternative, whose budget shapes this one batch (called under the lock)."""
        if self.live is None:
            return self.queue.next_batch(now), None
        memory = self.splitter.memory_budget
        in_force_budget = self.queue.policy.max_batch_tokens
        # Nothing is explored while an out-of-memory holds the budget down, nor unless texts wait beyond this batch.
        waiting = memory.current == memory.tuned and self.queue.tokens > in_force_budget
        arm = self.live.tuner.choose(now, waiting)
        if waiting and arm.budget != in_force_budget:
            self.queue.set_max_batch_tokens(arm.budget)
            try:
                batch = self.queue.next_batch(now)
            finally:
                self.queue.set_max_batch_tokens(in_force_budget)
            if batch is not None:
                return batch, arm
            arm = self.live.tuner.in_force
        return self.queue.next_batch(now), arm

    def start_running(self, collated: Collated) -> tuple[list[QueuedText], float]:
        """The batch's texts that still need their answer, now running, and when it starts. Cancelled ones, and those
        whose deadline would pass before the batch ends and its answers reach the event loop (at the model's measured
        rate), do not cost model time: a late answer is one the caller has stopped waiting for (under 3x overload,
        texts taken just before their deadline made a few 500 ms requests answer 200 after 600-700 ms)."""
        with self._changed:
            now = self.clock()
            live = [item for item in collated.batch.items if not item.handle.future.done()]
            late = missed_deadlines(live, now, self.rates.model.value, self.rates.delivery_lag)
            if late:
                dropped = {id(item) for item in late}
                live = [item for item in live if id(item) not in dropped]
                self._count_missed(late, now)
                self._loop_answers().fail(late, DeadlineExceeded(DeadlineExceeded.unreachable_message))
            self._in_flight.started(live, now)
            if live:
                self.rates.batch_started(now, collated.taken_at, collated.more_queued)
            return live, now

    def run_with(self, arm: Arm | None) -> None:
        """On the inference thread, before a batch runs: put its live-tuning setting's precision in force."""
        if arm is not None and self.live is not None:
            self.live.use_precision(arm.precision)

    def run_shadow(self, batch: Batch, arm: Arm, inputs: Any, answered: Scores, in_force_seconds: float) -> None:
        """On the inference thread, once a shadowed batch's answers (`answered`, in `in_force_seconds`) went out: run
        it again in `arm` and tell live tuning how the scores and the times compare."""
        assert self.live is not None, "only live tuning shadows batches"
        self.live.use_precision(arm.precision)
        started = self.clock()
        try:
            if inputs is None:
                inputs = self.model.collate([item.handle.ids for item in batch.items], batch.padded_length)
            shadow = self.model.run(inputs)
        except Exception:  # the callers have their answers; the check goes on with the next shadowed batch
            log.exception("a shadow run in %s failed", arm.precision)
            return
        seconds = self.clock() - started
        deviation, label_changes = self.live.compare(answered, shadow)
        with self._changed:
            tuner = self.live.tuner
            message, switch = tuner.checked(
                arm, len(batch.items), deviation, label_changes, batch.real_tokens, batch.padded_length, in_force_seconds, seconds, self.clock()
            )
            metrics.LIVE_TOKENS_PER_SECOND.labels(arm.precision, str(arm.budget)).set(tuner.tokens_per_second(arm))
            if message is not None:
                log.warning("%s", message)
            if switch is not None:
                self._carry_out(switch)

    def finish_running(self, batch: Batch | None, started: float, ended: float, answered_tokens: int, arm: Arm | None = None) -> None:
        """The running batch (None when none of its texts was left to run) ended, having answered `answered_tokens`
        real tokens, with live tuning's setting `arm`; the inference thread is idle."""
        with self._changed:
            self._in_flight.ended()
            self._changed.notify_all()  # the collation thread may wait for this batch's end (`take_batch`)
            if batch is not None:
                if arm is not None:
                    self._live_ran(arm, batch, ended - started, ended)
                self.rates.batch_ended(batch.real_tokens, started, ended, answered_tokens)
                if self.shared_batch_seconds and (rate := self.rates.tokens_per_second):
                    self.queue.set_shared_batch_tokens(int(rate * self.shared_batch_seconds))
                self._teach_calibration(batch.items, ended)
                metrics.ADMISSION_WAIT_FACTOR.set(self.rates.calibration.update())
                self._publish_queue_state()

    def live_info(self) -> dict | None:
        """Live tuning's figures for /info (None without live tuning)."""
        if self.live is None:
            return None
        with self._changed:
            return self.live.tuner.info(self.clock(), time.time())

    def _live_ran(self, arm: Arm, batch: Batch, seconds: float, now: float) -> None:
        """Tell live tuning what a batch did; carry out a switch it decides (called under the lock)."""
        assert self.live is not None, "batches carry a setting only with live tuning"
        switch = self.live.tuner.ran(arm, batch.real_tokens, batch.padded_length, seconds, now)
        metrics.LIVE_TOKENS_PER_SECOND.labels(arm.precision, str(arm.budget)).set(self.live.tuner.tokens_per_second(arm))
        if switch is not None:
            self._carry_out(switch)

    def _carry_out(self, switch: Switch) -> None:
        """Put a live-tuning switch in force (called under the lock)."""
        log.warning("%s", switch.describe())
        metrics.TUNING_SWITCHES.labels(switch.what).inc()
        if switch.what == "budget":
            self.queue.set_max_batch_tokens(self.splitter.memory_budget.retune(switch.new.budget))
            metrics.MAX_BATCH_TOKENS.set(switch.new.budget)
            metrics.EFFECTIVE_MAX_BATCH_TOKENS.set(self.queue.policy.max_batch_tokens)

    def set_budget(self, tokens: int) -> None:
        """Batches from now on stay within `tokens` (the splitting runner's memory budget)."""
        if tokens != self.queue.policy.max_batch_tokens:
            with self._changed:
                self.queue.set_max_batch_tokens(tokens)
            metrics.EFFECTIVE_MAX_BATCH_TOKENS.set(tokens)

    def _count_missed(self, items: list[QueuedText], now: float) -> None:
        """`items` missed their deadline and are dropped unrun (called under the lock)."""
        metrics.CANCELLED_TEXTS.labels("deadline").inc(len(items))
        self._teach_calibration(items, now)

    def _teach_calibration(self, items: list[QueuedText], now: float) -> None:
        """Teach the calibration how long those of `items` that opened a batch really waited, until `now` (called
        under the lock)."""
        for item in items:
            if item.handle.opening_wait is not None:
                self.rates.calibration.record(item.handle.opening_wait, now - item.arrived_at)

    def _publish_queue_state(self) -> None:
        drain_seconds = seconds_ahead(Backlog(self.queue.tokens), self.rates.tokens_per_second)
        batch_metrics.publish_queue(len(self.queue), self.queue.tokens, drain_seconds)
        metrics.ACTIVE_CALLERS.set(self.queue.callers)

    def _loop_answers(self) -> "Answers":
        assert self.answers is not None, "batches are taken only once started"
        return self.answers


class BatchThreads:
    """The two threads that run the batcher's batches: a collation thread takes each batch and builds its inputs
    while the current batch runs, then hands it over (one batch at most waits ready), so the inference thread only
    runs the model (through the batcher's splitting runner)."""

    def __init__(self, batcher: Batcher, answers: "Answers") -> None:
        self._batcher = batcher
        self._answers = answers
        # The collated batch waiting for the inference thread; None once draining has emptied the queue.
        self._ready: Queue[Collated | None] = Queue(maxsize=1)

    def start(self, inference_thread: Executor) -> asyncio.Future:
        """Start collating, and running on `inference_thread`; the future resolves once the queue is drained."""
        threading.Thread(target=self._collate_batches, name="collate", daemon=True).start()
        return asyncio.get_running_loop().run_in_executor(inference_thread, self._work)

    def _collate_batches(self) -> None:
        """Take each batch once the inference thread has taken the previous one, and build its inputs."""
        name_this_thread("clf-collate")
        try:
            while (taken := self._batcher.take_batch()) is not None:
                batch, more_queued, arm, shadow = taken
                taken_at = self._batcher.clock()
                self._ready.put(Collated(batch, self._collate(batch.items), taken_at, more_queued, arm, shadow))
                self._ready.join()  # taken: the next batch is chosen while this one runs, not before
        finally:
            self._ready.put(None)

    def _collate(self, items: list[QueuedText]) -> Any:
        try:
            padded_length = self._batcher.queue.policy.padded_length_of(items)
            return self._batcher.model.collate([item.handle.ids for item in items], padded_length)
        except Exception:  # the inference thread collates it again and fails only the texts that fail alone
            log.exception("collating a batch failed")
            return None

    def _work(self) -> None:
        name_this_thread("clf-inference")
        while (collated := self._ready.get()) is not None:
            live, started = self._batcher.start_running(collated)
            self._ready.task_done()  # only now may the collation thread take the next batch
            self._run(collated, live, started)

    def _run(self, collated: Collated, live: list[QueuedText], started: float) -> None:
        batcher = self._batcher
        if not live:
            batcher.finish_running(None, started, started, 0)
            return
        batcher.run_with(collated.arm)
        batch = Batch(live, batcher.queue.policy.padded_length_of(live), collated.batch.reason)
        inputs = collated.inputs if len(live) == len(collated.batch.items) else None
        batch_metrics.observe_start(batch, started)
        answered_tokens = 0
        whole: Scores | None = None  # the batch's scores when it ran as one
        for group, outcome in batcher.splitter.run(live, inputs):
            if isinstance(outcome, Exception):
                self._answers.fail(group, outcome)
            else:
                self._answers.answer(group, outcome, batcher.clock())
                answered_tokens += sum(item.tokens for item in group)
                whole = outcome if group is live else None
        ended = batcher.clock()
        batch_metrics.observe_end(live, started, ended)
        if collated.shadow is not None and whole is not None:
            batcher.run_shadow(batch, collated.shadow, inputs, whole, ended - started)
        batcher.finish_running(batch, started, ended, answered_tokens, collated.arm)


class Answers:
    """Hands outcomes from the batcher's threads to the callers' futures on the event loop, and measures how long
    answers take to get there (the drain rate's delivery lag)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, clock: Callable[[], float], rates: DrainRate) -> None:
        self._loop = loop
        self._clock = clock
        self._rates = rates

    def future(self) -> asyncio.Future:
        """A future for one text's scores (on the event loop)."""
        return self._loop.create_future()

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """On the event loop: run `callback` on it `delay` seconds from now."""
        self._loop.call_later(delay, callback)

    def fail(self, items: list[QueuedText], error: Exception) -> None:
        """From any thread: fail the texts' futures with `error` (those still waiting)."""
        self._loop.call_soon_threadsafe(_fail, items, error)

    def answer(self, items: list[QueuedText], scores: Scores, ended: float) -> None:
        """From any thread: the texts' scores, computed by a batch that ended at `ended`."""
        self._loop.call_soon_threadsafe(self.delivered, items, scores, ended)

    def delivered(self, items: list[QueuedText], scores: Scores, ended: float) -> None:
        """On the event loop: answer the batch's callers, and measure how long the answers took to get here."""
        lag = max(0.0, self._clock() - ended)
        metrics.ANSWER_DELIVERY.observe(lag)
        self._rates.answers_delivered(lag)
        _resolve(items, scores)


def _resolve(items: list[QueuedText], scores: Scores) -> None:
    for item, text_scores in zip(items, scores):
        if item.handle.future.done():  # its caller left (or its deadline passed) while the batch ran
            metrics.UNANSWERED_TOKENS.inc(item.tokens)
        else:
            item.handle.future.set_result(text_scores)


def _fail(items: list[QueuedText], error: Exception) -> None:
    for item in items:
        if not item.handle.future.done():
            item.handle.future.set_exception(error)
