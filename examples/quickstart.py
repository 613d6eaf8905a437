"""lmstack quickstart: the whole chain on the bundled defaults, as far as it has landed.

  1. generate the bundled world (examples/world, the `quickstart` preset): articles about invented
     entities, question/answer chats, and held-out questions;
  2. pretrain the default model from scratch with lmstack-train: a byte-level BPE tokenizer trained
     on the world, then a tiny InternLM-style (Llama-layout) decoder on the articles and the
     question/answer chats mixed (examples/configs/default_model.yaml);
  3. load the result as a user would load any Hugging Face checkpoint, run a forward pass, and, when
     transformers is installed, check that transformers loads it with the same logits;
  4. ask it the world's held-out closed-book questions (facts it read in articles but was never
     asked about) and report its accuracy against chance;
  5. generate with lmstack-infer's engine: greedy completions, a chat reply, seeded samples;
  6. serve it with `lmstack serve` (OpenAI-compatible, when lmstack-infer[server] is installed) and
     query it with the remote client.

Steps 1-2 take under 4 minutes on an idle 2-core CPU. Run it with `nox -s quickstart`, or
`python examples/quickstart.py [--model PATH]` to skip training and point steps 3-6 at an existing
Hugging Face directory (llama, mistral, qwen2, internlm2, internlm3) instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmstack.core import load_config, load_pretrained
from lmstack.core.tokenizer import Tokenizer
from lmstack.infer import LLM, RequestOutput, SamplingParams

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "configs"
MIN_Z = 4.0
sys.path.insert(0, str(REPO / "examples" / "world"))
import world  # noqa: E402  (examples/world is a folder of scripts, not a package)


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


# -- 1-2: the world and the default model ----------------------------------------------------------
def build_default_model(out: Path, *, resume: bool) -> Path:
    """Generate the world and pretrain the default model under ``out``; return its directory."""
    from lmstack.train import load_train_config
    from lmstack.train.recipes import PretrainConfig, pretrain

    world_dir = out / "world"
    step("1. generate the bundled world (preset 'quickstart')")
    params = world.PRESETS["quickstart"]
    start = time.perf_counter()
    world.generate(world_dir, seed=0, **vars(params))
    heldout = world.read_jsonl(world_dir / "heldout.jsonl")
    print(
        f"{params.num_entities} entities in {world_dir} ({time.perf_counter() - start:.2f} s): "
        f"{sum(1 for r in heldout if r['kind'] == 'fact')} held-out fact questions, "
        f"{sum(1 for r in heldout if r['kind'] == 'arithmetic')} held-out arithmetic questions"
    )

    run_dir = out / "pretrain"
    if not resume:  # a fresh run; --resume continues an interrupted one from its checkpoints
        shutil.rmtree(run_dir, ignore_errors=True)
    step("2. pretrain the default model (examples/configs/default_model.yaml)")
    cfg = load_train_config(
        PretrainConfig,
        CONFIGS / "default_model.yaml",
        [
            "--data.paths", str(world_dir / "pretrain.jsonl"), str(world_dir / "chats.jsonl"),
            "--run.output_dir", str(run_dir),
        ],
    )  # fmt: skip
    result = pretrain(cfg)
    print(result.summary())
    return result.model_dir


# -- 3: load it like any checkpoint ----------------------------------------------------------------
def load_and_check(path: Path) -> None:
    step(f"3. load {path}")
    config = load_config(path)
    start = time.perf_counter()
    model = load_pretrained(path, dtype=torch.float32)
    tokenizer = Tokenizer.from_pretrained(path)
    rope = config.rope_scaling.rope_type if config.rope_scaling else "plain"
    print(
        f"{config.model_type}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_attention_heads} heads / {config.num_key_value_heads} kv heads, "
        f"rope {rope}, theta {config.rope_theta:g}, vocab {config.vocab_size}"
    )
    print(f"{model.num_parameters():,} parameters, loaded in {time.perf_counter() - start:.2f} s")
    conversation = [{"role": "user", "content": "Where is Kadadell?"}]
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
    assert isinstance(text, str)
    ids = tokenizer.encode(text, add_special_tokens=False)
    print("chat prompt:\n" + text)
    assert tokenizer.decode(ids) == text, "decode(encode(text)) must give the text back"
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
    top = torch.topk(logits[0, -1].softmax(-1), k=5)
    guesses = ", ".join(
        f"{tokenizer.decode([int(i)])!r} {p:.3f}" for p, i in zip(top.values, top.indices, strict=True)
    )
    print(f"{len(ids)} tokens -> logits {tuple(logits.shape)}; next-token top 5: {guesses}")

    if importlib.util.find_spec("transformers") is None:
        print("(transformers is not installed: skipping the check that it loads the model the same)")
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    their_tokenizer = AutoTokenizer.from_pretrained(path)
    assert their_tokenizer(text, add_special_tokens=False)["input_ids"] == ids, "tokenizers disagree"
    with torch.no_grad():
        their_logits = theirs(torch.tensor([ids])).logits
    diff = (their_logits - logits).abs().max().item()
    print(f"transformers {type(theirs).__name__}: same tokens, max |logit difference| {diff:.2e}")
    assert diff < 1e-4, f"transformers' logits differ from lmstack's by {diff}"


# -- 4: closed-book evaluation -----------------------------------------------------------------------
def closed_book(llm: LLM, rows: Sequence[dict[str, Any]]) -> float:
    """Multiple-choice accuracy: each choice scored as the model's whole reply to the question.

    A choice's score is the log-sum-exp of the log-likelihoods of its answer sentences (the row's
    ``statements``: every way the chats taught the model to phrase such an answer), given the
    chat-formatted question; the highest-scoring choice is the model's answer.
    """
    requests: list[tuple[list[int], list[int]]] = []
    owners: list[tuple[int, int]] = []
    for i, row in enumerate(rows):
        prompt = llm.render_chat([{"role": "user", "content": row["question"]}])
        for j, sentences in enumerate(row["statements"]):
            for sentence in sentences:
                requests.append((prompt, llm.tokenizer.encode(sentence, add_special_tokens=False)))
                owners.append((i, j))
    scores: dict[tuple[int, int], list[float]] = {}
    for owner, (logprob, _) in zip(owners, llm.loglikelihood(requests, use_tqdm=False), strict=True):
        scores.setdefault(owner, []).append(logprob)
    correct = 0
    for i, row in enumerate(rows):
        choice = max(range(len(row["choices"])), key=lambda j: torch.tensor(scores[i, j]).logsumexp(0).item())
        correct += choice == row["label"]
    return correct / len(rows)


def evaluate_closed_book(llm: LLM, heldout_file: Path) -> dict[str, float]:
    """Print and return the z-score above chance of each kind of held-out question."""
    step("4. closed-book questions the model was never asked (held out of every chat)")
    rows = world.read_jsonl(heldout_file)
    z_scores: dict[str, float] = {}
    for kind in ("fact", "arithmetic"):
        subset = [r for r in rows if r["kind"] == kind]
        if not subset:
            continue
        chance = sum(1 / len(r["choices"]) for r in subset) / len(subset)
        accuracy = closed_book(llm, subset)
        # One-sided binomial z-score against guessing: how far above chance, in standard errors.
        z = z_scores[kind] = (accuracy - chance) / math.sqrt(chance * (1 - chance) / len(subset))
        print(
            f"{kind:<10} {len(subset):>3} questions: accuracy {accuracy:.1%} "
            f"(chance {chance:.0%}, z = {z:+.1f})"
        )
    # Greedy replies: does the reply name the answer? Once in the held-out wording, once with a
    # question wording the chats use for other facts (the fact itself is still never asked).
    manifest = world.read_manifest(heldout_file.parent) or {}
    the_world = world.build_world(
        manifest.get("seed", 0), manifest.get("params", {}).get("num_entities", 300)
    )
    facts = [r for r in rows if r["kind"] == "fact"]
    wordings = {
        "held-out wording": [r["question"] for r in facts],
        "chat wording": [world.ask(the_world.entity(r["entity"]), r["attribute"], 0) for r in facts],
    }
    for name, questions in wordings.items():
        replies = llm.chat(
            [[{"role": "user", "content": q}] for q in questions],
            SamplingParams(temperature=0, max_tokens=32),
            use_tqdm=False,
        )
        named = sum(
            world.mentions(o.outputs[0].text, r["answer"]) for o, r in zip(replies, facts, strict=True)
        )
        print(f"greedy replies naming the answer, {name}: {named}/{len(facts)}; e.g.")
        for question, row, out in list(zip(questions, facts, replies, strict=True))[:3]:
            print(f"  {question} -> {out.outputs[0].text!r} [{row['answer']}]")
    return z_scores


# -- 5: generation -------------------------------------------------------------------------------------
def show(outputs: list[RequestOutput], labels: list[str] | None = None) -> int:
    """Print each request's completions under its label (default: its prompt); return their tokens."""
    tokens = 0
    for i, out in enumerate(outputs):
        head = labels[i] if labels else repr(out.prompt)
        for c in out.outputs:
            sample = f" [sample {c.index}]" if len(out.outputs) > 1 else ""
            print(f"{head}{sample} -> {c.text!r} ({len(c.token_ids)} tokens, {c.finish_reason})")
            tokens += len(c.token_ids)
    return tokens


def generate_with_infer(llm: LLM) -> None:
    step("5. generate with lmstack-infer")
    engine = llm.engine
    print(
        f"engine: KV cache of {engine.num_blocks} blocks x {engine.config.block_size} tokens, "
        f"context {llm.max_model_len}"
    )
    start = time.perf_counter()
    greedy = SamplingParams(temperature=0, max_tokens=24)
    print("greedy:")
    tokens = show(llm.generate(["Kadadell", "The river", "12 + 30 ="], greedy, use_tqdm=False))
    conversation = [
        {"role": "system", "content": "You are a helpful assistant. Answer in one sentence."},
        {"role": "user", "content": "Which river does Kadadell lie on?"},
    ]
    print("chat:")
    tokens += show(llm.chat(conversation, greedy, use_tqdm=False), [f"user: {conversation[-1]['content']!r}"])
    print("sampled (temperature 0.8, top_p 0.95, seed 0, n=2):")
    sampled = SamplingParams(n=2, temperature=0.8, top_p=0.95, seed=0, max_tokens=24)
    tokens += show(llm.generate(["Kadadell"], sampled, use_tqdm=False))
    seconds = time.perf_counter() - start
    print(f"generated {tokens} tokens in {seconds:.2f} s ({tokens / seconds:.0f} tokens/s)")


# -- 6: serving -------------------------------------------------------------------------------------------
def serve_and_query(path: Path) -> None:
    step("6. serve it with `lmstack serve` and query it with the remote client")
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        print("(lmstack-infer[server] is not installed: pip install 'lmstack-infer[server]' to serve)")
        return
    from lmstack.infer import RemoteLLM

    # The command a user runs, on a free port; it prints its address once it accepts requests.
    command = [sys.executable, "-m", "lmstack.core", "serve", str(path), "--port", "0"]
    command += ["--served-model-name", "default"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert server.stdout is not None
        url, said = None, []
        for line in server.stdout:  # "lmstack serve: default on http://127.0.0.1:PORT/v1 (...)"
            if line.startswith("lmstack serve:") and " on http" in line:
                url = line.split(" on ", 1)[1].split()[0]
                break
            said.append(line)
        if url is None:
            raise RuntimeError(
                f"`{' '.join(command)}` exited with status {server.wait()} before serving:\n{''.join(said)}"
            )
        print(f"$ lmstack serve {path} --port 0 --served-model-name default\nserving on {url}")
        with RemoteLLM(url, tokenizer=path) as remote:
            print(f"GET /v1/models -> {remote.models()}")
            question = [{"role": "user", "content": "Which river does Kadadell lie on?"}]
            reply = remote.chat(question, SamplingParams(temperature=0, max_tokens=24))[0]
            answer = reply.outputs[0]
            print(f"POST /v1/chat/completions -> {answer.text!r} ({answer.finish_reason})")
    finally:
        server.send_signal(signal.SIGTERM)  # drains in-flight requests, then exits 0
        status = server.wait(timeout=60)
    print(f"server stopped (exit status {status})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="an existing Hugging Face model directory: skip training")
    parser.add_argument(
        "--out", type=Path, default=REPO / "out" / "quickstart", help="where the world and the runs go"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted training run from its checkpoints"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()

    path = args.model or build_default_model(args.out, resume=args.resume)
    load_and_check(path)
    llm = LLM(path, dtype=torch.float32)
    z_scores: dict[str, float] = {}
    try:
        heldout = args.out / "world" / "heldout.jsonl"
        if args.model is None or heldout.is_file():
            z_scores = evaluate_closed_book(llm, heldout)
        generate_with_infer(llm)
    finally:
        llm.close()
    serve_and_query(path)
    print(f"\nquickstart finished in {time.perf_counter() - started:.0f} s")
    # The default model must know the facts it read: held-out fact accuracy at least MIN_Z standard
    # errors above guessing (about 48% against 25% chance on the quickstart world's 55 questions).
    if args.model is None and z_scores.get("fact", 0.0) < MIN_Z:
        sys.exit(
            f"error: the default model answered the held-out facts at z = {z_scores.get('fact')}, "
            f"not {MIN_Z} standard errors above chance: training did not work"
        )


if __name__ == "__main__":
    main()
