"""The persistent batch: ids, positions and KV slots from its tables equal those built from the lists."""

from __future__ import annotations

import random

import torch

from lmstack.infer._sampling_params import SamplingParams
from lmstack.infer.engine._block_manager import BlockManager
from lmstack.infer.engine._input_batch import InputBatch
from lmstack.infer.engine._sampler import SamplingState
from lmstack.infer.engine._scheduler import ScheduledSeq, Scheduler, SchedulerConfig
from lmstack.infer.engine._sequence import Sequence


def test_step_inputs_equal_a_rebuild_from_the_sequences_through_chunks_preemption_and_reuse() -> None:
    """A scheduler with a tight cache and budget (chunked prefills, preemptions, rows freed and taken
    again) drives the batch; every step's tensors equal the ones computed token by token."""
    bs, vocab = 4, 50
    rng = random.Random(3)
    bm = BlockManager(num_blocks=12, block_size=bs, enable_prefix_caching=True)
    sched = Scheduler(SchedulerConfig(max_model_len=40, max_num_seqs=3, max_num_batched_tokens=7), bm)
    batch = InputBatch(10, bs, torch.device("cpu"), SamplingState(vocab, "cpu", capacity=1), capacity=1)
    seqs = []
    for i in range(9):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(2, 14))]
        if i % 3 == 2:
            prompt = seqs[0].prompt_token_ids[:8] + prompt  # a shared prefix: prefix-cache hits
        seq = Sequence(i, f"r{i}", prompt, len(prompt) + rng.randint(2, 9))
        seqs.append(seq)
        sched.add(seq)
    decode_steps = rows_taken = 0
    while sched.has_unfinished:
        plan = sched.schedule()
        scheduled = plan.scheduled
        for item in scheduled:
            if batch.row_of(item.seq) is None:
                batch.add(item.seq, SamplingParams(), None)
                rows_taken += 1
        rows = [batch.row_of(item.seq) for item in scheduled]
        inputs = batch.prepare(scheduled, rows)  # type: ignore[arg-type]
        ids, positions, slots, sample_at = [], [], [], []
        for item in scheduled:
            seq = item.seq
            ids += seq.token_ids_slice(item.start, item.end)
            positions += range(item.start, item.end)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(item.start, item.end)]
            if item.samples:
                sample_at.append(len(ids) - 1)
        assert inputs.token_ids.tolist() == ids
        assert inputs.positions.tolist() == positions
        assert inputs.slot_mapping.tolist() == slots
        assert (inputs.sample_at.tolist() if inputs.sample_at is not None else []) == sample_at
        decode_steps += len(ids) == len(scheduled) and all(
            i.start >= len(i.seq.prompt_token_ids) for i in scheduled
        )
        finished, kept_rows, kept_tokens = set(), [], []
        for item, row in zip(inputs.sampled, inputs.sampled_rows, strict=True):
            token = rng.randrange(vocab)
            item.seq.output_token_ids.append(token)
            if item.seq.num_tokens >= item.seq.max_total_tokens:
                finished.add(item.seq.seq_id)
            else:
                kept_rows.append(row)
                kept_tokens.append(token)
        batch.record(kept_rows, kept_tokens)
        for seq in sched.update(scheduled, finished):
            batch.remove(seq)
    assert batch.num_rows == 0 and batch.sampling.num_rows == 0
    assert sum(s.num_preemptions for s in seqs) > 0 and decode_steps > 0
    assert rows_taken == len(seqs) and batch.block_tables.shape[0] < len(seqs)  # rows were reused


def test_a_one_token_recompute_chunk_reads_its_own_token_not_the_last_sampled_one() -> None:
    batch = InputBatch(4, 4, torch.device("cpu"), SamplingState(50, "cpu"))
    decoding = Sequence(0, "a", [1, 2, 3], 20, output_token_ids=[7], num_computed_tokens=3, block_table=[2])
    # Preempted and being recomputed one token at a time: position 4 holds 11, the last sampled is 12.
    recomputing = Sequence(1, "b", [4, 5, 6], 20, output_token_ids=[10, 11, 12], num_computed_tokens=4,
                           block_table=[0, 1])  # fmt: skip
    rows = [batch.add(decoding, SamplingParams(), None), batch.add(recomputing, SamplingParams(), None)]
    inputs = batch.prepare([ScheduledSeq(decoding, 1), ScheduledSeq(recomputing, 1)], rows)
    assert inputs.token_ids.tolist() == [7, 11] and inputs.positions.tolist() == [3, 4]
    assert inputs.slot_mapping.tolist() == [2 * 4 + 3, 1 * 4 + 0] and inputs.sampled_rows == [rows[0]]
