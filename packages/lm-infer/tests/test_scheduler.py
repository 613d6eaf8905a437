"""Scheduler: continuous batching, chunked prefill, preemption by recompute, FIFO, failures, aborts.

Requests reach the scheduler validated (the engine's door, tested in test_engine.py).

A small fake engine plays the model: it checks that every token a step reads has the right K/V in
the sequence's blocks (its "K/V" is a digest of the token prefix), writes the K/V of the scheduled
tokens, and samples a token that depends on the whole context, so a wrongly resumed sequence would
generate different tokens than a run with a cache large enough to never preempt.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import pytest

from lmstack.core import ConfigError
from lmstack.infer.engine._block_manager import BlockManager
from lmstack.infer.engine._scheduler import ScheduledSeq, Scheduler, SchedulerConfig, SchedulerOutput
from lmstack.infer.engine._sequence import Sequence, SequenceStatus

VOCAB = 50


def prefix_digests(tokens: list[int]) -> list[int]:
    digests, d = [], 17
    for t in tokens:
        d = hash((d, t))
        digests.append(d)
    return digests


@dataclass
class FakeEngine:
    """Drives a Scheduler as the engine does, checking its promises along the way."""

    num_blocks: int
    block_size: int = 4
    max_model_len: int = 256
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 64
    chunked: bool = True
    prefix_caching: bool = True
    bm: BlockManager = field(init=False)
    sched: Scheduler = field(init=False)
    kv: dict[tuple[int, int], int] = field(default_factory=dict)
    max_tokens: dict[int, int] = field(default_factory=dict)
    finished: list[Sequence] = field(default_factory=list)
    finish_step: dict[int, int] = field(default_factory=dict)
    first_step: dict[int, int] = field(default_factory=dict)
    failed: list[Sequence] = field(default_factory=list)
    preempted_snapshots: list[tuple[Sequence, list[int]]] = field(default_factory=list)
    outputs: list[SchedulerOutput] = field(default_factory=list)
    steps: int = 0
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.bm = BlockManager(self.num_blocks, self.block_size, self.prefix_caching)
        config = SchedulerConfig(
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            enable_chunked_prefill=self.chunked,
        )
        self.sched = Scheduler(config, self.bm)

    def add(self, prompt: list[int], max_tokens: int, request_id: str | None = None) -> Sequence:
        seq_id = next(self._ids)
        max_total = min(len(prompt) + max_tokens, self.max_model_len)
        seq = Sequence(seq_id, request_id or f"req-{seq_id}", list(prompt), max_total)
        self.max_tokens[seq_id] = max_tokens
        self.sched.add(seq)
        return seq

    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        self.steps += 1
        self.outputs.append(out)
        self._check_plan(out)
        self.failed.extend(out.failed)
        for seq in out.preempted:
            self.preempted_snapshots.append((seq, seq.all_token_ids))
        finished: set[int] = set()
        for item in out.scheduled:
            self.first_step.setdefault(item.seq.seq_id, self.steps)
            self._run(item)
            seq = item.seq
            if item.samples:
                out_len = len(seq.output_token_ids)
                if out_len >= self.max_tokens[seq.seq_id] or seq.num_tokens >= seq.max_total_tokens:
                    seq.status = SequenceStatus.FINISHED_LENGTH
                    finished.add(seq.seq_id)
        done = self.sched.update(out.scheduled, finished)
        assert {s.seq_id for s in done} == finished
        for seq in done:
            assert seq.block_table == [] and seq.status is SequenceStatus.FINISHED_LENGTH
            self.finish_step[seq.seq_id] = self.steps
        self.finished.extend(done)
        self.bm.check_invariants(self.sched.running)
        return out

    def run_until_done(self, max_steps: int = 10_000) -> None:
        while self.sched.has_unfinished:
            assert self.steps < max_steps, "the scheduler stopped making progress"
            self.step()
        assert self.bm.num_free_blocks == self.bm.num_blocks
        self.bm.check_invariants([])

    def _check_plan(self, out: SchedulerOutput) -> None:
        cfg = self.sched.config
        assert out.num_batched_tokens == sum(s.num_tokens for s in out.scheduled)
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens
        assert len(out.scheduled) <= cfg.max_num_seqs
        assert self.sched.num_running <= cfg.max_num_seqs
        assert len({id(s.seq) for s in out.scheduled}) == len(out.scheduled)
        assert all(s.num_tokens >= 1 for s in out.scheduled)
        # Running ones first by arrival, then the newly admitted ones, also by arrival.
        assert [s.seq.seq_id for s in out.scheduled] == sorted(s.seq.seq_id for s in out.scheduled)
        running = [s.seq_id for s in self.sched.running]
        waiting = [s.seq_id for s in self.sched.waiting]
        assert running == sorted(running) and waiting == sorted(waiting)
        assert not running or not waiting or max(running) < min(waiting)
        for seq in out.preempted:
            assert (
                seq.status is SequenceStatus.WAITING
                and seq.block_table == []
                and seq.num_computed_tokens == 0
            )
        for seq in out.failed:
            assert seq.status is SequenceStatus.FINISHED_ERROR and seq.error and seq.block_table == []
        if not cfg.enable_chunked_prefill:
            assert all(s.samples for s in out.scheduled)

    def _run(self, item: ScheduledSeq) -> None:
        seq, bs = item.seq, self.block_size
        assert item.start == seq.num_computed_tokens and item.end <= seq.num_tokens
        assert len(seq.block_table) * bs >= item.end
        digests = prefix_digests(seq.all_token_ids)
        for p in range(item.start):  # attention reads every earlier token's K/V
            assert self.kv[seq.block_table[p // bs], p % bs] == digests[p], "wrong K/V read"
        for p in range(item.start, item.end):
            block = seq.block_table[p // bs]
            assert self.bm.ref_count(block) == 1, "writing into a shared block"
            self.kv[block, p % bs] = digests[p]
        if item.samples:
            seq.output_token_ids.append(digests[item.end - 1] % VOCAB)


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def outputs_by_request(engine: FakeEngine) -> dict[str, list[int]]:
    return {seq.request_id: seq.output_token_ids for seq in engine.finished}


# ---------------------------------------------------------------------------------------------


def test_every_request_completes_within_limits() -> None:
    rng = random.Random(0)
    engine = FakeEngine(num_blocks=64, max_num_seqs=6, max_num_batched_tokens=32)
    pending = [
        (rng.randrange(40), random_prompt(rng, rng.randint(1, 60)), rng.randint(1, 20)) for _ in range(30)
    ]
    pending.sort(key=lambda r: r[0])
    while pending or engine.sched.has_unfinished:
        while pending and pending[0][0] <= engine.steps:
            _, prompt, max_tokens = pending.pop(0)
            engine.add(prompt, max_tokens)
        engine.step()
        assert engine.steps < 2000
    assert engine.bm.num_free_blocks == engine.bm.num_blocks
    assert len(engine.finished) == 30 and not engine.failed
    for seq in engine.finished:
        assert len(seq.output_token_ids) == engine.max_tokens[seq.seq_id]
    assert max(len(o.scheduled) for o in engine.outputs) == 6


def test_chunked_prefill_splits_a_long_prompt() -> None:
    engine = FakeEngine(num_blocks=64, max_num_batched_tokens=16)
    seq = engine.add(list(range(50)), max_tokens=3)
    chunks: list[tuple[int, bool]] = []
    while engine.sched.has_unfinished:
        out = engine.step()
        chunks.extend((s.num_tokens, s.samples) for s in out.scheduled)
    assert chunks == [(16, False), (16, False), (16, False), (2, True), (1, True), (1, True)]
    assert len(seq.output_token_ids) == 3


def test_decodes_keep_running_during_a_chunked_prefill() -> None:
    engine = FakeEngine(num_blocks=64, max_num_batched_tokens=8)
    decoder = engine.add([1, 2, 3], max_tokens=10)
    engine.step()  # prefill of the decoder
    long = engine.add(list(range(30)), max_tokens=1)
    plans = []
    for _ in range(4):
        out = engine.step()
        plans.append([(s.seq.seq_id, s.num_tokens) for s in out.scheduled])
    # The decoder gets its token every step; the long prompt gets the rest of the budget.
    assert plans == [[(decoder.seq_id, 1), (long.seq_id, 7)]] * 4
    engine.run_until_done()


def test_prefill_is_whole_without_chunking() -> None:
    engine = FakeEngine(num_blocks=64, max_model_len=64, max_num_batched_tokens=64, chunked=False)
    decoders = [engine.add(random_prompt(random.Random(i), 10), max_tokens=20) for i in range(4)]
    engine.step()
    long = engine.add(list(range(61)), max_tokens=3)
    out = engine.step()
    # 4 decode tokens leave 60 of the 64 tokens: the 61-token prompt waits (no chunking)...
    assert [s.seq.seq_id for s in out.scheduled] == [d.seq_id for d in decoders]
    engine.step()
    engine.run_until_done()
    # ...and it was prefilled in one piece once the decoders were done.
    first = next(s for o in engine.outputs for s in o.scheduled if s.seq is long)
    assert first.num_tokens == 61
    assert len(long.output_token_ids) == 3


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        SchedulerConfig(max_model_len=4096, max_num_batched_tokens=2048, enable_chunked_prefill=False)
    with pytest.raises(ConfigError):
        SchedulerConfig(max_model_len=0)
    with pytest.raises(ConfigError):
        SchedulerConfig(max_model_len=128, max_num_seqs=0)


def test_max_num_seqs_is_respected() -> None:
    engine = FakeEngine(num_blocks=64, max_num_seqs=3)
    for i in range(10):
        engine.add([i, i + 1], max_tokens=5)
    engine.run_until_done()
    assert max(len(o.scheduled) for o in engine.outputs) == 3
    assert len(engine.finished) == 10


def _preemption_workload(engine: FakeEngine, rng: random.Random) -> None:
    for _ in range(12):
        engine.add(random_prompt(rng, 10), max_tokens=14)


def test_preemption_resumes_exactly_and_keeps_fifo() -> None:
    # 12 requests of 24 tokens (6 blocks each) with room for 16 blocks: only 2 or 3 fit at once.
    small = FakeEngine(num_blocks=16, max_num_batched_tokens=32)
    _preemption_workload(small, random.Random(7))
    small.run_until_done()
    reference = FakeEngine(num_blocks=256, max_num_batched_tokens=32)
    _preemption_workload(reference, random.Random(7))
    reference.run_until_done()

    assert sum(seq.num_preemptions for seq in small.finished) > 0
    assert all(seq.num_preemptions == 0 for seq in reference.finished)
    # Same tokens as with a cache that never preempts: generation resumed exactly where it stopped.
    assert outputs_by_request(small) == outputs_by_request(reference)
    for seq, snapshot in small.preempted_snapshots:
        assert seq.all_token_ids[: len(snapshot)] == snapshot
    # Equal-length requests finish in arrival order.
    steps = [small.finish_step[i] for i in sorted(small.finish_step)]
    assert steps == sorted(steps)


def test_preempted_sequences_go_back_to_the_front_youngest_first() -> None:
    engine = FakeEngine(num_blocks=6, max_num_batched_tokens=64)
    a = engine.add(list(range(7)), max_tokens=10)  # 2 blocks for the prompt
    b = engine.add(list(range(10, 17)), max_tokens=10)
    c = engine.add(list(range(20, 27)), max_tokens=10)
    d = engine.add(list(range(30, 37)), max_tokens=10)
    engine.step()  # a, b, c admitted (6 blocks); d waits
    assert engine.sched.num_running == 3 and engine.sched.waiting == [d]
    engine.step()  # every one is at 8 tokens: full blocks
    out = engine.step()  # a needs a third block: c (the youngest) is preempted, then b for b
    assert out.preempted == [c]
    assert [s.seq for s in out.scheduled] == [a, b]
    assert engine.sched.waiting == [c, d]
    assert c.num_preemptions == 1
    engine.run_until_done()
    assert [s.seq_id for s in engine.finished] == [a.seq_id, b.seq_id, c.seq_id, d.seq_id]


def test_a_sequence_preempts_itself_when_it_is_the_youngest() -> None:
    engine = FakeEngine(num_blocks=4, max_num_batched_tokens=64)
    a = engine.add(list(range(5)), max_tokens=6)  # 11 tokens: 3 blocks at most
    b = engine.add(list(range(10, 17)), max_tokens=5)  # 12 tokens: 3 blocks at most
    engine.step()  # a: 2 blocks, b: 2 blocks, none free
    engine.step()
    out = engine.step()  # a still fits 2 blocks; b's 9th token needs a third: b is the youngest
    assert out.preempted == [b] and [s.seq for s in out.scheduled] == [a]
    engine.run_until_done()
    assert b.num_preemptions == 1 and len(b.output_token_ids) == 5


def test_strict_fifo_no_overtaking() -> None:
    engine = FakeEngine(num_blocks=8, max_num_batched_tokens=64)
    engine.add(list(range(20)), max_tokens=4)  # 6 blocks
    big = engine.add(list(range(100, 116)), max_tokens=4)  # 5 blocks: waits
    small = engine.add([1], max_tokens=1)  # would fit, but may not overtake
    out = engine.step()
    assert [s.seq.seq_id for s in out.scheduled] == [0]
    assert engine.sched.waiting == [big, small]
    engine.run_until_done()
    assert engine.first_step[big.seq_id] <= engine.first_step[small.seq_id]


def test_add_rejects_a_reused_or_out_of_order_sequence() -> None:
    engine = FakeEngine(num_blocks=8)
    seq = engine.add([1, 2], max_tokens=2)
    with pytest.raises(ValueError):
        engine.sched.add(seq)
    with pytest.raises(ValueError):
        engine.sched.add(Sequence(seq.seq_id, "again", [1], 4))


def test_abort_frees_blocks() -> None:
    engine = FakeEngine(num_blocks=16, max_num_seqs=2)
    running = engine.add(list(range(10)), max_tokens=20, request_id="running")
    other = engine.add(list(range(10, 20)), max_tokens=20)
    waiting = engine.add(list(range(20, 30)), max_tokens=20, request_id="waiting")
    engine.step()
    engine.step()
    free_before = engine.bm.num_free_blocks
    assert engine.sched.abort("running") == [running]
    assert running.status is SequenceStatus.FINISHED_ABORTED and running.block_table == []
    assert engine.bm.num_free_blocks == free_before + 3
    assert engine.sched.abort("waiting") == [waiting]
    assert waiting.status is SequenceStatus.FINISHED_ABORTED
    assert engine.sched.abort("unknown") == []
    engine.run_until_done()
    assert [s.seq_id for s in engine.finished] == [other.seq_id]


def test_abort_between_schedule_and_update() -> None:
    engine = FakeEngine(num_blocks=16)
    a = engine.add([1, 2, 3, 4, 5], max_tokens=5, request_id="a")
    b = engine.add([6, 7, 8], max_tokens=5)
    out = engine.sched.schedule()
    engine.sched.abort("a")
    engine._run(next(item for item in out.scheduled if item.seq is b))  # the step still ran b
    assert engine.sched.update(out.scheduled, set()) == []
    assert a.num_computed_tokens == 0 and a.block_table == []
    assert b.num_computed_tokens == 3
    engine.run_until_done()


def test_all_sequences_of_a_request_are_aborted() -> None:
    engine = FakeEngine(num_blocks=16)
    seqs = [engine.add([1, 2, 3], max_tokens=5, request_id="n2") for _ in range(2)]
    engine.step()
    assert engine.sched.abort("n2") == seqs
    assert not engine.sched.has_unfinished and engine.bm.num_free_blocks == 16


def test_shared_prompt_hits_the_prefix_cache() -> None:
    engine = FakeEngine(num_blocks=32, max_num_batched_tokens=64)
    system = list(range(20))
    first = engine.add([*system, 40, 41], max_tokens=3)
    engine.step()
    second = engine.add([*system, 42, 43, 44], max_tokens=3)
    out = engine.step()
    assert second.num_cached_prompt_tokens == 20
    assert [s.num_tokens for s in out.scheduled if s.seq is second] == [3]
    engine.run_until_done()
    assert len(first.output_token_ids) == len(second.output_token_ids) == 3
    # A finished sequence's blocks stay cached: the same prompt again reuses them.
    third = engine.add([*system, 40, 41], max_tokens=1)
    engine.run_until_done()
    assert third.num_cached_prompt_tokens == 20


def test_random_workload_under_memory_pressure_matches_a_large_cache() -> None:
    def workload(engine: FakeEngine) -> None:
        rng = random.Random(99)
        systems = [random_prompt(rng, 12) for _ in range(3)]
        pending = []
        for _ in range(40):
            prompt = rng.choice(systems)[: rng.randint(0, 12)] + random_prompt(rng, rng.randint(1, 14))
            pending.append((rng.randrange(60), prompt, rng.randint(1, 16)))
        pending.sort(key=lambda r: r[0])
        while pending or engine.sched.has_unfinished:
            while pending and pending[0][0] <= engine.steps:
                _, prompt, max_tokens = pending.pop(0)
                engine.add(prompt, max_tokens)
            engine.step()
            assert engine.steps < 3000
        assert engine.bm.num_free_blocks == engine.bm.num_blocks

    small = FakeEngine(num_blocks=14, max_num_seqs=8, max_num_batched_tokens=12)
    workload(small)
    large = FakeEngine(num_blocks=400, max_num_seqs=8, max_num_batched_tokens=12, prefix_caching=False)
    workload(large)
    assert sum(s.num_preemptions for s in small.finished) > 0
    assert small.bm.prefix_cache_hits > 0
    assert len(small.finished) == 40
    assert outputs_by_request(small) == outputs_by_request(large)


def test_blocks_of_a_sequence_finishing_in_its_prefill_step_are_cached() -> None:
    engine = FakeEngine(num_blocks=16)
    engine.add(list(range(9)), max_tokens=1)
    engine.run_until_done()
    assert engine.bm.num_cached_blocks == 2
    again = engine.add(list(range(9)), max_tokens=1)
    engine.run_until_done()
    assert again.num_cached_prompt_tokens == 8


def test_a_sequence_outgrowing_the_cache_fails_instead_of_looping() -> None:
    # The engine is supposed to stop a sequence at max_total_tokens; if it does not, the sequence
    # eventually cannot fit even alone, and the scheduler fails it rather than spin for ever.
    engine = FakeEngine(num_blocks=2, block_size=4)
    other = engine.add([5], max_tokens=1)
    runaway = engine.add([1, 2, 3], max_tokens=5)
    runaway.max_total_tokens = 10**6
    engine.max_tokens[runaway.seq_id] = 10**6
    engine.run_until_done(max_steps=50)
    assert runaway.status is SequenceStatus.FINISHED_ERROR and runaway.error
    assert runaway.num_preemptions == 1 and runaway.num_tokens == 9
    assert other.status is SequenceStatus.FINISHED_LENGTH
