"""Tensor-parallel serving: ``LLM(path, tensor_parallel_size=N)`` and ``lmstack serve --tp N`` on CPU (gloo).

The reference is the same checkpoint served by one process (``tensor_parallel_size=1``), with the same
engine options, so both schedule the same steps. Greedy tokens must be equal token for token: the
tiny models' weights are scaled up (``conftest``) so greedy choices have clear margins, and the only
difference under tensor parallelism is the order in which the row-parallel projections' partial sums
are added (float32 rounding, about 1e-6 relative). Log-probs are compared with atol 1e-4 for that
reason.

One tensor-parallel LLM lives in a process at a time (it owns the default torch.distributed group), so
the tp=2 tests share one class-scoped LLM that is closed before the tp=4 test starts its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
from conftest import corpus

from lmstack.core import CausalLM, ConfigError, ModelConfig, save_pretrained, train_bpe_tokenizer
from lmstack.infer import LLM, InferError, InvalidRequestError, SamplingParams
from lmstack.infer.engine import EngineConfig

# Small blocks, a small step budget and few sequences at once: prompts are prefilled in chunks over
# several steps, requests queue and join a running batch, and decode steps mix with prefill chunks.
OPTIONS = {"block_size": 4, "max_num_batched_tokens": 24, "max_num_seqs": 4, "kv_cache_memory": "256KB"}
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

STEM = "the quick brown fox jumps over the lazy dog while seven wizards"
PROMPTS = [
    "hex",
    "the quick",
    STEM,  # 30+ tokens: prefilled in chunks under the 24-token budget
    "a lazy dog.",
    f"{STEM} quietly jumps over a jovial zebra",
    "seven jovial zebras",
    "quietly the brown dog jumps over seven lazy wizards while the quick fox",
    "zebras.",
]


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _gone(pids: list[int], timeout: float = 10.0) -> bool:
    """Whether every process in ``pids`` has exited (a zombie counts as exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return True
        time.sleep(0.05)
    return False


def _has_server_extra() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("fastapi", "uvicorn", "openai"))


def _tokens(outs: list) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def ref(model_dir: Path) -> Iterator[LLM]:
    with LLM(model_dir, **OPTIONS) as llm:
        yield llm


class TestTwoRanks:
    @pytest.fixture(scope="class")
    @classmethod
    def tp2(cls, model_dir: Path) -> Iterator[LLM]:
        before = _children()
        llm = LLM(model_dir, tensor_parallel_size=2, **OPTIONS)
        group = llm.engine.tensor_parallel
        assert group is not None and len(group.worker_pids) == 1
        assert set(group.worker_pids) <= _children() - before
        with llm:
            yield llm
        # Leaving the block stopped the worker and left the process group: a new group may start.
        assert _gone(group.worker_pids), "a tensor-parallel worker outlived LLM.close()"
        assert not dist.is_initialized()
        with pytest.raises(InferError, match="closed"):
            llm.generate(["hex"], GREEDY)

    def test_greedy_tokens_equal_one_process_with_batching_chunks_and_prefix_hits(
        self, tp2: LLM, ref: LLM
    ) -> None:
        expected = ref.generate(PROMPTS, GREEDY)
        got = tp2.generate(PROMPTS, GREEDY)
        assert _tokens(got) == _tokens(expected)
        assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in expected]
        # Again, with prompts that extend earlier ones: their prefix blocks are cache hits on rank 0,
        # and every rank reads the same blocks of its own cache (the block tables travel each step).
        again = [f"{STEM} quietly", f"{PROMPTS[6]} jumps", STEM]
        expected = ref.generate(again, GREEDY)
        got = tp2.generate(again, GREEDY)
        assert _tokens(got) == _tokens(expected)
        assert [o.num_cached_tokens for o in got] == [o.num_cached_tokens for o in expected]
        assert min(o.num_cached_tokens for o in got) >= 24

    def test_log_probs_and_seeded_samples_come_from_whole_logits(self, tp2: LLM, ref: LLM) -> None:
        params = SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True)
        [expected] = ref.generate([PROMPTS[4]], params)
        [got] = tp2.generate([PROMPTS[4]], params)
        assert got.outputs[0].token_ids == expected.outputs[0].token_ids
        for mine, theirs in zip(got.outputs[0].logprobs, expected.outputs[0].logprobs, strict=True):
            assert mine.keys() == theirs.keys()
            for token, lp in theirs.items():
                assert mine[token] == pytest.approx(lp, abs=1e-4)
        # n > 1 with a seed: rank 0 samples, so sampling features work as in one process.
        seeded = SamplingParams(temperature=0.8, n=2, seed=7, max_tokens=5)
        [a] = tp2.generate(["the quick"], seeded)
        [b] = tp2.generate(["the quick"], seeded)
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]

    def test_kv_cache_per_rank_holds_its_own_kv_heads(self, tp2: LLM, ref: LLM) -> None:
        kv_heads = ref.engine.model.config.num_key_value_heads
        assert tp2.engine.cache is not None and ref.engine.cache is not None
        assert tp2.engine.cache.keys.shape[2] == kv_heads // 2
        # The same byte budget per rank holds twice the tokens.
        assert tp2.engine.kv_bytes_per_token * 2 == ref.engine.kv_bytes_per_token
        assert tp2.engine.num_blocks == 2 * ref.engine.num_blocks
        assert tp2.engine.num_free_blocks == tp2.engine.num_blocks  # everything freed after the requests

    def test_streams_on_the_engine_thread(self, tp2: LLM, ref: LLM) -> None:
        import asyncio

        async def run() -> list[int]:
            ids: list[int] = []
            async for out in tp2.stream(PROMPTS[6], GREEDY):
                ids.extend(out.outputs[0].token_ids)
            return ids

        [expected] = ref.generate([PROMPTS[6]], GREEDY)
        assert asyncio.run(run()) == list(expected.outputs[0].token_ids)

    def test_scoring_is_refused_with_a_clear_error(self, tp2: LLM) -> None:
        refused = r"is not supported with tensor_parallel_size=2"
        with pytest.raises(InvalidRequestError, match=rf"^loglikelihood {refused}"):
            tp2.loglikelihood([("the quick", " brown")])
        with pytest.raises(InvalidRequestError, match=rf"^loglikelihood_rolling {refused}"):
            tp2.loglikelihood_rolling(["the quick brown fox"])
        with pytest.raises(InvalidRequestError, match=rf"^prompt_logprobs \(echo with logprobs\) {refused}"):
            tp2.prompt_logprobs([1, 2, 3])
        # The engine is unaffected.
        assert _tokens(tp2.generate(["hex"], GREEDY))[0]


def _qwen2_tied(out: Path) -> Path:
    """8 query / 4 kv heads (tp=4 divides them), q/k/v biases, tied embeddings, 297 tokens (not divisible)."""
    tokenizer = train_bpe_tokenizer(iter(corpus()), vocab_size=297, min_frequency=2)
    torch.manual_seed(1)
    config = ModelConfig(
        model_type="qwen2", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=88,
        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = CausalLM(config)
    model.reset_parameters(std=0.25)
    with torch.no_grad():  # biases and norms that matter, so a shard mix-up would show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(mean=1.0 if "norm" in name else 0.0, std=0.2)
    save_pretrained(model, out, tokenizer=tokenizer)
    return out


def test_four_ranks_with_an_int8_kv_cache_and_a_worker_that_dies(tmp_path: Path) -> None:
    path = _qwen2_tied(tmp_path / "qwen2-tied")
    # The kernels' torch references read the int8 codes (prefill and decode). Default batching: every
    # step has one of two shapes, which keeps DTensor's per-shape work on four ranks over two cores small.
    options = {"kv_cache_dtype": "int8", "kv_cache_memory": "256KB"}
    prompts = PROMPTS[:6]
    with LLM(path, **options) as one:
        expected = one.generate(prompts, GREEDY)
    llm = LLM(path, tensor_parallel_size=4, **options)
    try:
        group = llm.engine.tensor_parallel
        assert group is not None and len(group.worker_pids) == 3
        assert _tokens(llm.generate(prompts, GREEDY)) == _tokens(expected)
        # A worker that dies: the next step fails at once with an error naming it, never hangs.
        victim = group.worker_pids[1]
        os.kill(victim, signal.SIGKILL)
        assert _gone([victim])
        with pytest.raises(InferError, match=rf"worker rank 2 \(pid {victim}\) exited with status -9"):
            llm.generate(["hex"], GREEDY)
        with pytest.raises(InferError, match="broken"):
            llm.generate(["hex"], GREEDY)
        assert group.failure is not None and f"pid {victim}" in group.failure
        if _has_server_extra():  # a server on top reports it, so a supervisor can restart it
            from fastapi.testclient import TestClient

            from lmstack.infer.server import create_app

            health = TestClient(create_app(llm, close_llm=False)).get("/health")
            assert health.status_code == 503 and health.json()["status"] == "unhealthy"
    finally:
        llm.close()
    assert _gone(group.worker_pids)
    assert not dist.is_initialized()


def test_a_degree_that_does_not_divide_the_heads_is_refused_before_any_process_starts(
    model_dir: Path, ref: LLM, tmp_path: Path
) -> None:
    before = _children()
    with pytest.raises(ConfigError, match=r"num_attention_heads=4 is not divisible by 3.*here: 1, 2"):
        LLM(model_dir, tensor_parallel_size=3)
    with pytest.raises(ConfigError, match="kernels='triton' is not supported with tensor_parallel_size"):
        LLM(model_dir, tensor_parallel_size=2, kernels="triton")
    with pytest.raises(ConfigError, match="needs a checkpoint path"):
        LLM(ref.engine.model, ref.tokenizer, tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="tensor_parallel_size must be a positive integer"):
        EngineConfig(tensor_parallel_size=0)
    # A checkpoint that declares weight quantization (its layers are not plain nn.Linear).
    quantized = tmp_path / "quantized"
    shutil.copytree(model_dir, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="weight-quantized checkpoint; tensor_parallel_size > 1"):
        LLM(quantized, tensor_parallel_size=2)
    assert _children() == before
    assert not dist.is_initialized()


def test_lmstack_serve_tp2_serves_openai_clients_like_one_process(model_dir: Path, ref: LLM) -> None:
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    script = Path(sys.executable).with_name("lmstack")
    # Default batching (the in-process tests cover chunks and queueing): few distinct step shapes.
    args = [str(script), "serve", str(model_dir), "--port", "0", "--served-model-name", "tiny", "--tp", "2"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        line = proc.stdout.readline()  # the ready line, printed once the server accepts requests
        assert line.startswith("lmstack serve: tiny on http://127.0.0.1:"), (line, proc.stderr.read())
        workers = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert len(workers) == 1
        base = line.split(" on ", 1)[1].split()[0]
        client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=60)

        batch = client.completions.create(model="tiny", prompt=PROMPTS[:4], max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})  # fmt: skip
        expected = ref.generate(PROMPTS[:4], GREEDY)
        texts = [c.text for c in sorted(batch.choices, key=lambda c: c.index)]
        assert texts == [o.outputs[0].text for o in expected]

        chat = [{"role": "user", "content": "seven lazy wizards"}]
        chat_params = SamplingParams(temperature=0, max_tokens=8)
        [expected_chat] = ref.chat(chat, chat_params)
        events = client.chat.completions.create(model="tiny", messages=chat, max_tokens=8, temperature=0,
                                                stream=True)  # fmt: skip
        parts = [c.choices[0].delta.content or "" for c in events if c.choices]
        assert "".join(parts) == expected_chat.outputs[0].text

        # Echo scoring is refused with a clear 400, and the server goes on serving.
        with pytest.raises(openai.BadRequestError, match="not supported with tensor_parallel_size=2"):
            client.completions.create(model="tiny", prompt="the quick", max_tokens=0, echo=True, logprobs=1)
        again = client.completions.create(model="tiny", prompt="hex", max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})  # fmt: skip
        assert again.choices[0].text == expected[0].outputs[0].text

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert _gone(workers), "a tensor-parallel worker outlived the server"


def test_cli_tp_flag_parses_both_spellings() -> None:
    import argparse

    from lmstack.infer.server._cli import register_serve

    parser = argparse.ArgumentParser()
    register_serve(parser.add_subparsers())
    assert parser.parse_args(["serve", "m", "--tp", "2"]).tensor_parallel_size == 2
    assert parser.parse_args(["serve", "m", "--tensor-parallel-size", "4"]).tensor_parallel_size == 4
    assert parser.parse_args(["serve", "m"]).tensor_parallel_size == 1


def test_step_header_and_payload_round_trip() -> None:
    """The flat int64 form of a step carries every field back unchanged (ragged tables included)."""
    from lmstack.infer.engine._tensor_parallel import ModelStep, _pack, _unpack

    step = ModelStep(
        token_ids=torch.tensor([5, 6, 7, 8, 9]), positions=torch.tensor([0, 1, 2, 7, 3]),
        slot_mapping=torch.tensor([40, 41, 42, 13, 99]), query_lens=[3, 1, 1], context_lens=[3, 8, 4],
        block_tables=[[10], [3, 1], [24]], rope_seq_lens=torch.tensor([[3, 3, 3, 8, 4]]),
        sample_at=torch.tensor([2, 4]),
    )  # fmt: skip
    header, payload = _pack(step)
    back = _unpack(header.tolist(), payload, torch.device("cpu"))
    assert json.dumps(back.block_tables) == json.dumps(step.block_tables)
    assert (back.query_lens, back.context_lens) == (step.query_lens, step.context_lens)
    for name in ("token_ids", "positions", "slot_mapping", "rope_seq_lens", "sample_at"):
        assert torch.equal(getattr(back, name), getattr(step, name)), name
    bare = ModelStep(step.token_ids[:1], step.positions[:1], step.slot_mapping[:1], [1], [1], [[0]],
                     rope_seq_lens=None, sample_at=None)  # fmt: skip
    header, payload = _pack(bare)
    back = _unpack(header.tolist(), payload, torch.device("cpu"))
    assert back.rope_seq_lens is None and back.sample_at is None


def test_the_worker_a_signal_killed_is_named_before_those_that_exited_after_it(tmp_path: Path) -> None:
    """Killing rank 3 breaks rank 1's connection and it exits (status 1) before the engine polls."""
    from lmstack.infer.engine._tensor_parallel import _Workers

    class Exited:
        def __init__(self, pid: int, code: int | None) -> None:
            self.pid, self.code = pid, code

        def poll(self) -> int | None:
            return self.code

    workers = _Workers(tmp_path)
    workers.procs = [Exited(101, None), Exited(102, None)]  # type: ignore[list-item]
    assert workers.dead() is None
    workers.procs = [Exited(101, 1), Exited(102, None), Exited(103, -9)]  # type: ignore[list-item]
    workers.logs = [tmp_path / f"rank{i}.log" for i in (1, 2, 3)]
    workers.logs[2].write_text("killed here")
    message = workers.dead()
    assert message is not None
    assert message.startswith("tensor-parallel worker rank 3 (pid 103) exited with status -9")
    assert "rank 1 exited too, with status 1" in message and message.endswith("killed here")
