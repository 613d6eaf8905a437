"""lmstack quickstart: the whole chain on the bundled defaults, as far as it has landed.

  1. generate the bundled world (examples/world, the `quickstart` preset): articles about invented
     entities, question/answer chats, and held-out questions;
  2. pretrain the default model from scratch with lmstack-train: a byte-level BPE tokenizer trained
     on the world, then a tiny InternLM-style (Llama-layout) decoder on the articles and the
     question/answer chats mixed (examples/configs/default_model.yaml);
  3. load the result as a user would load any Hugging Face checkpoint, run a forward pass, and, when
     transformers is installed, check that transformers loads it with the same logits;
  4. evaluate it with lmstack-eval's built-in world tasks: the held-out closed-book questions (facts it
     read in articles but was never asked about) scored three ways side by side (the value's
     log-likelihood after the question, whole answer statements, greedy replies), arithmetic, and
     answers from a given context, each with its standard error and chance level; results, per-sample
     logs and the answer cache go to OUT/eval;
  5. a needle-in-a-haystack grid: a fact hidden at several depths of haystacks cut from the world's
     articles, lengths counted in the model's own tokens up to its context; a Markdown table and a
     heatmap (OUT/eval/needle.png, with matplotlib);
  6. generate with lmstack-infer's engine: greedy completions, a chat reply, seeded samples, JSON
     under a schema (guided decoding) and a tool call generated under its tool's schema;
  7. answer from documents with lmstack-rag: index the world's articles (hybrid dense + BM25 search),
     calibrate the relevance gate on labelled questions and score it on held-out ones (retrieval hit@k,
     MRR, nDCG; rejection precision, recall, F1), then the held-out facts asked closed-book and with
     retrieved passages, both scored by lmstack-eval; one cited answer and one refused chat message;
  8. serve it with `lmstack serve` (OpenAI-compatible, when lmstack-infer[server] is installed) and
     query it with the remote client, once with OpenAI's response_format json_schema;
  9. one graph search with lmstack-agent over the world's articles, served by a local search server
     that answers in SearxNG's JSON: the planner's sub-questions (JSON generated under its schema),
     each node's queries and the pages it read, and the answer with its references;
 10. quantize it with `lmstack quantize rtn` (int8, and int4 in groups of 16) and score each on the
     held-out facts beside float32, with the weight bytes on disk; export a q8_0 GGUF for llama.cpp;
 11. align it with DPO (`lmstack train dpo`, examples/configs/dpo_world.yaml) on 85% of the world's
     preference pairs and measure how often it prefers the chosen answer of the other 15%, before and
     after, in all and by kind (facts, sums, "<name> is not known." for names the world does not
     have, real names' facts over that denial), and the held-out closed-book facts after.

Steps 1-2 take under 4 minutes on an idle 2-core CPU. Run it with `nox -s quickstart`, or
`python examples/quickstart.py [--model PATH]` to skip training and point steps 3-8 at an existing
Hugging Face directory (llama, mistral, qwen2, internlm2, internlm3) instead (steps 4-5 and 7 need
the world in OUT/world).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from lmstack.core import load_config, load_pretrained
from lmstack.core.tokenizer import Tokenizer
from lmstack.eval import evaluate
from lmstack.eval.report import needle_table, plot_needle
from lmstack.eval.tasks import ChatConfig, DatasetConfig, GenerationKwargs, MetricConfig, TaskConfig
from lmstack.eval.tasks.builtin import Needle, builtin_task_names, needle_task, read_haystack
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


# -- 4-5: evaluation with lmstack-eval -------------------------------------------------------------
# A needle in the world's own wording, about a city and a river no article names: the default model
# has learned the sentence pattern, so the grid measures whether it finds the fact, not the phrasing.
NEEDLE = Needle("The river Orvell flows through Brannock.", "Which river does Brannock lie on?", "Orvell")
# The world's answer-from-context prompt (world_context asks the same way).
NEEDLE_PROMPT = world.CONTEXT_INSTRUCTION + "\n\nContext:\n{{document}}\n\nQuestion: {{question}}"
NEEDLE_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
NEEDLE_SHORTEST = 128
NEEDLE_LONGEST = 2048  # a bound on the step's time for models with long contexts
NEEDLE_REPLY_TOKENS = 32


def z_above_chance(accuracy: float, chance: float, n: int) -> float:
    """One-sided binomial z-score against guessing: how far above chance, in standard errors."""
    return (accuracy - chance) / math.sqrt(chance * (1 - chance) / n)


def percent(value: float, stderr: float | None) -> str:
    """A score and its standard error in percent: ``41.8% ± 6.7``."""
    return f"{value:.1%}" + ("" if stderr is None else f" ± {stderr * 100:.1f}")


def greedy_task(name: str, path: Path) -> TaskConfig:
    """Ask each row's ``question`` as a chat; score whether the greedy reply names ``answer``."""
    return TaskConfig(
        name=name,
        dataset=DatasetConfig(format="jsonl", data_files={"test": (path,)}),
        output_type="generate_until",
        doc_to_text="question",
        doc_to_target="answer",
        generation=GenerationKwargs(max_gen_toks=32),
        metrics=(MetricConfig("contains"),),
        chat=ChatConfig(),
    )


def chat_wording_task(world_dir: Path, eval_dir: Path) -> TaskConfig:
    """The held-out facts asked in a wording the chats use for other facts (the fact itself never asked).

    Written next to the results as data, then asked and scored as ``world_heldout_greedy`` does.
    """
    facts = [r for r in world.read_jsonl(world_dir / "heldout.jsonl") if r["kind"] == "fact"]
    manifest = world.read_manifest(world_dir) or {}
    the_world = world.build_world(
        manifest.get("seed", 0), manifest.get("params", {}).get("num_entities", 300)
    )
    path = eval_dir / "heldout_chat_wording.jsonl"
    eval_dir.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in facts:
            question = world.ask(the_world.entity(row["entity"]), row["attribute"], 0)
            f.write(json.dumps({"question": question, "answer": row["answer"]}) + "\n")
    return greedy_task("world_heldout_greedy_chat_wording", path)


def evaluate_world(llm: LLM, name: str, world_dir: Path, eval_dir: Path) -> float:
    """Run the world's tasks through lmstack-eval; print them and return the statements' z-score."""
    step("4. evaluate it with lmstack-eval: held-out closed-book questions, arithmetic, answers from context")
    start = time.perf_counter()
    # Every built-in task over the world, and the held-out facts in the chats' wording.
    world_tasks = [name for name in builtin_task_names() if name.startswith("world_")]
    result = evaluate(
        llm,
        [*world_tasks, chat_wording_task(world_dir, eval_dir)],
        data_dir=world_dir,
        output_dir=eval_dir,
        model_name=name,
        use_tqdm=False,
    )
    cache = result.cache
    print(
        f"{len(result.tasks)} tasks, {cache.hits + cache.misses:,} model calls ({cache.misses:,} computed, "
        f"{cache.hits:,} from the cache) in {time.perf_counter() - start:.1f} s; "
        f"results in {eval_dir / 'results.md'}"
    )
    facts = [r for r in world.read_jsonl(world_dir / "heldout.jsonl") if r["kind"] == "fact"]
    chance = sum(1 / len(r["choices"]) for r in facts) / len(facts)
    print(f"held-out facts: {len(facts)} questions on facts it read but was never asked, scored three ways:")
    z_scores = {}
    for task, how in (
        ("world_heldout_mc", "the value's log-likelihood after the question"),
        ("world_heldout_statements", "the likelihood of whole answer statements"),
    ):
        acc = result.tasks[task].metrics["acc"]
        z_scores[task] = z_above_chance(acc.value, chance, acc.n)
        score = percent(acc.value, acc.stderr)
        print(f"  {how:<47} {score:>13} (chance {chance:.0%}, z = {z_scores[task]:+.1f})  [{task}]")
    # Greedy replies: once in the held-out wording, once in a wording the chats use for other facts.
    for task, wording in (
        ("world_heldout_greedy", "held-out wording"),
        ("world_heldout_greedy_chat_wording", "chat wording"),
    ):
        named = result.tasks[task].metrics["contains"]
        label = f"greedy replies naming the value, {wording}"
        score = f"{round(named.value * named.n)}/{named.n}"
        print(f"  {label:<47} {score:>13} ({percent(named.value, named.stderr)})  [{task}]")
        for sample in result.tasks[task].samples[:3]:
            question = sample["prompt"][-1]["content"]
            print(f"    {question} -> {sample['answers'][0]['texts'][0]!r} [{sample['target']}]")
    arithmetic = result.tasks["world_arithmetic"].metrics["exact_match"]
    print(
        f"arithmetic: {arithmetic.n} held-out sums, the last number of a greedy reply: "
        f"{percent(arithmetic.value, arithmetic.stderr)}  [world_arithmetic]"
    )
    context = result.tasks["world_context"].metrics["contains"]
    chats = world.read_jsonl(world_dir / "context_chats.jsonl")
    refusals = sum(not row["meta"]["answerable"] for row in chats) / len(chats)
    print(
        f"answer from context: {context.n} questions on given excerpts (or say they do not tell): "
        f"{percent(context.value, context.stderr)} (always refusing: {refusals:.0%})  [world_context]"
    )
    return z_scores["world_heldout_statements"]


def needle_lengths(llm: LLM) -> list[int]:
    """Haystack lengths in the model's tokens: doubling from 128 to the longest its context holds."""
    question = NEEDLE_PROMPT.replace("{{document}}", "").replace("{{question}}", NEEDLE.question)
    overhead = len(llm.render_chat([{"role": "user", "content": question}]))
    # Room for the reply, and a margin: the haystack's tokens may merge differently inside the prompt.
    longest = (min(llm.max_model_len, NEEDLE_LONGEST) - overhead - NEEDLE_REPLY_TOKENS - 16) // 64 * 64
    lengths = [NEEDLE_SHORTEST]
    while lengths[-1] * 2 < longest:
        lengths.append(lengths[-1] * 2)
    return [n for n in lengths if n < longest] + [longest]


def needle_in_a_haystack(llm: LLM, name: str, world_dir: Path, eval_dir: Path) -> None:
    """A length x depth grid of the needle through lmstack-eval: its table, and a heatmap PNG."""
    step("5. needle in a haystack: a fact hidden in the world's articles, lengths in the model's tokens")
    start = time.perf_counter()
    lengths = needle_lengths(llm)
    task = needle_task(
        llm.tokenizer,
        read_haystack(world_dir),
        lengths=lengths,
        depths=NEEDLE_DEPTHS,
        needles=(NEEDLE,),
        prompt=NEEDLE_PROMPT,
        max_gen_toks=NEEDLE_REPLY_TOKENS,
    )
    result = evaluate(
        llm,
        [task],
        output_dir=eval_dir / "needle",
        cache=eval_dir / "cache.sqlite",
        model_name=name,
        use_tqdm=False,
    )
    samples = result.tasks[task.name].samples
    grid = task.grid({s["doc_id"]: s["metrics"]["contains"] for s in samples})
    print(
        f"needle {NEEDLE.fact!r}, asked {NEEDLE.question!r}; {len(samples)} documents of "
        f"{', '.join(map(str, lengths))} tokens ({time.perf_counter() - start:.1f} s); "
        "the share of replies naming the value:"
    )
    print(needle_table(grid), end="")
    example = max(samples, key=lambda s: task.docs[s["doc_id"]]["length"])
    print(f"e.g. at {task.docs[example['doc_id']]['length']} tokens: {example['answers'][0]['texts'][0]!r}")
    if importlib.util.find_spec("matplotlib") is None:
        print("(matplotlib is not installed: pip install 'lmstack-eval[plots]' for the heatmap)")
        return
    png = plot_needle(grid, eval_dir / "needle.png", title=f"Needle in a haystack: {name}")
    print(f"heatmap: {png}")


# -- 7: answers from documents with lmstack-rag ----------------------------------------------------------
# Chunks of about the size of the excerpts in the world's context chats, two passages a question: the
# default model answers from prompts as long as those it was trained on.
RAG_CHUNK_TOKENS = 96
RAG_PASSAGES = 2


def answer_from_documents(llm: LLM, name: str, world_dir: Path, out: Path) -> None:
    """Index the world's articles, calibrate the gate, and answer the held-out questions from the passages."""
    step("7. answer from the world's articles with lmstack-rag: hybrid search, the gate, cited answers")
    if importlib.util.find_spec("lmstack.rag") is None:
        print("(lmstack-rag is not installed: pip install lmstack-rag to run this step)")
        return
    sys.path.insert(0, str(REPO / "examples" / "rag"))
    import labelled  # examples/rag: the labelled questions over the world

    from lmstack.rag import Assistant, ChunkingConfig, Index, evaluate_index

    start = time.perf_counter()
    rag_dir, eval_dir = out / "rag", out / "eval"
    docs = rag_dir / "world_docs"
    labelled.write_world_documents(world_dir, docs)
    chunking = ChunkingConfig(chunk_tokens=RAG_CHUNK_TOKENS, overlap_tokens=RAG_CHUNK_TOKENS // 4)
    index = Index.open(rag_dir / "index", create=True, chunking=chunking)
    report = index.ingest(docs, use_tqdm=False)
    print(f"$ lmstack rag ingest {docs} --index {rag_dir / 'index'}\n{report.summary()}")

    # The gate: fitted on one half of the labelled questions, scored on the other with retrieval.
    splits = labelled.world_questions(world_dir)
    related = [row["question"] for row in splits["related_calibrate"]]
    unrelated = [row["question"] for row in splits["unrelated_calibrate"]]
    calibration, _ = index.calibrate(related, unrelated, use_tqdm=False)
    print(
        f"gate calibrated on {len(related)} related and {len(unrelated)} unrelated questions "
        f"(off-topic chatter, and questions about names the world does not have): "
        f"F1 {calibration.cross_validated.f1:.3f} cross-validated"
    )
    questions = [{**row, "relevant": row["sources"]} for row in splits["related_test"]]
    scores = evaluate_index(index, questions, splits["unrelated_test"], use_tqdm=False)
    print(f"held-out halves ({len(questions)} related, {len(splits['unrelated_test'])} unrelated):")
    print(scores.table())

    # Answers: the held-out facts closed-book against the same questions with retrieved passages, asked
    # and scored by lmstack-eval the same way (greedy reply naming the value).
    assistant = Assistant(
        index, llm, k=RAG_PASSAGES, instruction=world.CONTEXT_INSTRUCTION,
        sampling_params=SamplingParams(max_tokens=32, temperature=0.0),
    )  # fmt: skip
    facts = [r for r in world.read_jsonl(world_dir / "heldout.jsonl") if r["kind"] == "fact"]
    path = eval_dir / "heldout_with_passages.jsonl"
    eval_dir.mkdir(parents=True, exist_ok=True)
    found = 0
    with path.open("w", encoding="utf-8") as f:
        for row in facts:
            hits = index.search(row["question"], RAG_PASSAGES)
            found += any(row["answer"] in hit.text for hit in hits)
            f.write(
                json.dumps({"question": assistant.prompt(row["question"], hits), "answer": row["answer"]})
                + "\n"
            )
    result = evaluate(
        llm, ["world_heldout_greedy", greedy_task("world_heldout_rag", path)],
        data_dir=world_dir, output_dir=eval_dir / "rag", model_name=name, use_tqdm=False,
    )  # fmt: skip
    closed = result.tasks["world_heldout_greedy"].metrics["contains"]
    opened = result.tasks["world_heldout_rag"].metrics["contains"]
    print(f"held-out facts, greedy replies naming the value ({closed.n} questions):")
    for label, score, task in (
        ("closed-book", closed, "world_heldout_greedy"),
        (f"with {RAG_PASSAGES} retrieved passages", opened, "world_heldout_rag"),
    ):
        named = f"{round(score.value * score.n)}/{score.n}"
        print(f"  {label:<28} {named:>7} ({percent(score.value, score.stderr)})  [{task}]")
    print(f"  (the passages held the value for {found}/{len(facts)} questions)")

    question = facts[0]["question"]
    answer = assistant.ask(question)
    print(f"ask: {question!r}\n  -> {answer.text!r}")
    cited = ", ".join(f"[{c.number}] {c.source}" for c in answer.citations)
    print(f"  citations: {cited or 'none (the default model was not trained to cite)'}; passages shown:")
    for passage_number, hit in enumerate(answer.passages, start=1):
        print(f"  [{passage_number}] {hit.source} ({hit.score:.4f})")
    chatter = "Does anyone know a good pizza place near the office?"
    refused = assistant.ask(chatter)
    print(f"ask: {chatter!r}\n  -> {refused.text!r} (refused: {refused.reason})")
    index.close()
    print(f"step 7 took {time.perf_counter() - start:.0f} s")


# -- 6: generation -------------------------------------------------------------------------------------
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
    step("6. generate with lmstack-infer")
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
    # Structured output: the grammar guarantees JSON valid under the schema, whatever the model knows.
    print("JSON under a schema (guided_json; a grammar masks every token the schema does not allow):")
    town = {
        "type": "object",
        "properties": {"town": {"type": "string"}, "river": {"type": "string"},
                       "founded": {"type": "integer", "minimum": 0, "maximum": 3000}},
        "required": ["town", "river", "founded"],
    }  # fmt: skip
    structured = SamplingParams(temperature=0, max_tokens=48, guided_json=town)
    tokens += show(llm.generate(["Kadadell, as JSON:"], structured, use_tqdm=False))
    # Tool calling: with tool_choice "required" the call is generated under its JSON schema.
    weather = {
        "type": "function",
        "function": {
            "name": "river_level",
            "description": "Current water level of a river, in metres.",
            "parameters": {
                "type": "object",
                "properties": {"river": {"type": "string"}},
                "required": ["river"],
            },
        },
    }
    asked = [{"role": "user", "content": "How high is the river at Kadadell today?"}]
    reply = llm.chat(asked, SamplingParams(temperature=0, max_tokens=96), tools=[weather],
                     tool_choice="required", use_tqdm=False)[0].outputs[0]  # fmt: skip
    for call in reply.tool_calls or []:
        print(f"tool call -> {call.name}({call.arguments}) [{call.id}]")
    if not reply.tool_calls:
        print(f"no tool call; the reply: {reply.text!r} ({reply.finish_reason})")
    tokens += len(reply.token_ids)
    seconds = time.perf_counter() - start
    print(f"generated {tokens} tokens in {seconds:.2f} s ({tokens / seconds:.0f} tokens/s)")


# -- 8: serving -------------------------------------------------------------------------------------------
def serve_and_query(path: Path) -> None:
    step("8. serve it with `lmstack serve`; query it with the remote client and `lmstack chat`")
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
            # OpenAI's structured outputs: response_format json_schema, guaranteed to parse.
            schema = {"type": "object", "properties": {"river": {"type": "string"}}, "required": ["river"]}
            response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema,
                                                                     "strict": True}}  # fmt: skip
            # guided_json_fit (lmstack's extension): the JSON always completes within max_tokens.
            fitted = SamplingParams(temperature=0, max_tokens=48, guided_json_fit=True)
            reply = remote.chat(question, fitted, response_format=response_format)[0]
            print(f"POST /v1/chat/completions (response_format json_schema) -> {reply.outputs[0].text}")
        # The terminal chat against the same server, two turns piped in (the second sees the first).
        chat = [sys.executable, "-m", "lmstack.core", "chat", url, "--temperature", "0", "--max-tokens", "24"]
        turns = "Which river does Kadadell lie on?\nAnd what is it known for?\n/exit\n"
        done = subprocess.run(chat, input=turns, capture_output=True, text=True, timeout=300, check=False)
        print(f"$ lmstack chat {url} --temperature 0 --max-tokens 24  (two turns piped in)")
        print(done.stdout.rstrip() or done.stderr.rstrip())
    finally:
        server.send_signal(signal.SIGTERM)  # drains in-flight requests, then exits 0
        status = server.wait(timeout=60)
    print(f"server stopped (exit status {status})")


# -- 9: a graph search agent ----------------------------------------------------------------------------
AGENT_QUESTION = "On which river does Kadadell lie, and what is Kadadell known for?"


def graph_search(path: Path, world_dir: Path) -> None:
    step("9. a graph search with lmstack-agent over the world's articles (a local SearxNG-compatible server)")
    if importlib.util.find_spec("lmstack.agent") is None:
        print("(lmstack-agent is not installed: pip install lmstack-agent to run this step)")
        return
    from lmstack.agent import GraphSearchAgent
    from lmstack.agent.tools import LocalSearchServer, SearxNGSearch

    start = time.perf_counter()
    # A small model knows no JSON: its plans are generated under the actions' schema, and
    # guided_json_fit makes each one complete within max_tokens.
    params = SamplingParams(temperature=0, max_tokens=128, guided_json_fit=True)
    llm = LLM(path, dtype=torch.float32)
    try:
        with LocalSearchServer(world_dir / "articles.jsonl") as server:
            print(
                f"search server: {server.url}/search?q=...&format=json over {len(server.documents)} articles"
            )
            agent = GraphSearchAgent(llm, SearxNGSearch(server.url), max_nodes=3, max_plan_steps=2,
                                     max_retries=1, params=params)  # fmt: skip
            result = None
            for event in agent.stream(AGENT_QUESTION):
                data = event.data
                if event.type == "plan":
                    print(f"  planner: {data['raw'][:160]}")
                elif event.type == "node_added":
                    after = data["parents"] or "the question"
                    print(f"  node {data['name']!r}: {data['question']!r} (after {after})")
                elif event.type == "queries":
                    print(f"  {data['node']!r} searches {data['queries']}")
                elif event.type == "page_read":
                    print(f"  {data['node']!r} read {data['title']!r} ({data['chars']} characters)")
                elif event.type == "planner_error":
                    print(f"  planner output rejected and fed back: {data['error'][:100]}")
                elif event.type == "final_answer":
                    result = data
        if result is not None:
            print(f"answer: {result['answer'][:300]!r}")
            for ref in result["references"]:
                print(f"  [{ref['n']}] {ref['title']} {ref['url']}")
    finally:
        llm.close()
    print(f"step 9 took {time.perf_counter() - start:.0f} s")


# -- 10: quantization and GGUF ----------------------------------------------------------------------------
QUANT_TASKS = ("world_heldout_mc", "world_heldout_statements", "world_heldout_greedy")


def quantize_and_export(path: Path, world_dir: Path, out: Path) -> None:
    step("10. quantize it (`lmstack quantize rtn`, int8 and int4); export GGUF (`lmstack convert --to gguf`)")
    lmstack = [sys.executable, "-m", "lmstack.core"]
    # The default model's MLP is 688 wide: int4 groups must divide it, so 16 columns a group here.
    variants = {"int8": ["--bits", "8"], "int4 (group 16)": ["--bits", "4", "--group-size", "16"]}
    dirs = {"float32": path}
    for label, flags in variants.items():
        target = out / "quantized" / label.split()[0]
        command = [*lmstack, "quantize", "rtn", str(path), str(target), *flags, "--no-progress"]
        print(f"$ lmstack quantize rtn {path} {target} {' '.join(flags)}")
        subprocess.run(command, check=True, capture_output=True, text=True)
        dirs[label] = target
    world_tasks = [t for t in QUANT_TASKS if t in builtin_task_names()]
    facts = [r for r in world.read_jsonl(world_dir / "heldout.jsonl") if r["kind"] == "fact"]
    print(f"held-out facts ({len(facts)} questions), the same tasks as step 4, and weight bytes on disk:")
    for label, model_dir in dirs.items():
        weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        llm = LLM(model_dir, dtype=torch.float32)
        try:
            result = evaluate(
                llm, world_tasks, data_dir=world_dir, model_name=f"default model, {label}",
                output_dir=out / "eval-quantized" / label.split()[0], use_tqdm=False,
            )  # fmt: skip
        finally:
            llm.close()
        scores = []
        for task in world_tasks:
            metric = result.tasks[task].metrics
            value = metric["acc"] if "acc" in metric else metric["contains"]
            scores.append(f"{task.removeprefix('world_heldout_')} {percent(value.value, value.stderr)}")
        print(f"  {label:<16} {weights / 1e6:6.2f} MB  " + ", ".join(scores))
    gguf = out / "default-q8_0.gguf"
    command = [*lmstack, "convert", str(path), str(gguf), "--to", "gguf", "--type", "q8_0"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    size = gguf.stat().st_size / 1e6
    print(f"$ lmstack convert {path} {gguf} --to gguf --type q8_0")
    print(f"wrote {size:.2f} MB, a file llama.cpp runs (llama-cli -m {gguf.name})")


# -- 11: preference alignment ---------------------------------------------------------------------------
DPO_HELDOUT_PERCENT = 15  # of the world's preference pairs, kept out of DPO to measure it on


def align_with_dpo(path: Path, world_dir: Path, out: Path) -> None:
    """DPO on most of the world's preference pairs; preference accuracy on the rest, before and after."""
    import hashlib

    from lmstack.train import DataConfig, score_preferences

    step(
        "11. align it with DPO (`lmstack train dpo`): preference accuracy on held-out pairs, before and after"
    )
    start = time.perf_counter()
    rows = world.read_jsonl(world_dir / "preferences.jsonl")
    held = [hashlib.sha256(r["id"].encode()).digest()[0] * 100 // 256 < DPO_HELDOUT_PERCENT for r in rows]
    split = out / "preferences"
    split.mkdir(parents=True, exist_ok=True)
    for name, keep in (("train", False), ("heldout", True)):
        with (split / f"{name}.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r, h in zip(rows, held, strict=True) if h == keep)
    run = out / "dpo"
    shutil.rmtree(run, ignore_errors=True)  # a fresh run each time (the reference table stays cached)
    config = CONFIGS / "dpo_world.yaml"
    command = [
        sys.executable, "-m", "lmstack.core", "train", "dpo", str(config), "--model", str(path),
        "--data.paths", str(split / "train.jsonl"), "--data.cache_dir", str(out / "cache"),
        "--run.output_dir", str(run), "--run.tensorboard", "false",
    ]  # fmt: skip
    print(
        f"$ lmstack train dpo {config.relative_to(REPO)} --model {path} --data.paths {split}/train.jsonl ..."
    )
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: lmstack train dpo failed:\n{done.stderr[-3000:]}")
    print("\n".join(line for line in done.stdout.splitlines() if line.strip()))
    heldout = DataConfig(paths=[str(split / "heldout.jsonl")], format="preference", max_length=256)
    before = score_preferences(path, heldout)
    after = score_preferences(run / "final", heldout)
    print(f"held-out pairs ({len(after)}, never trained on): the chosen answer preferred")
    for label, scores in (("before", before), ("after DPO", after)):
        by_sum, by_token = scores.accuracy(), scores.accuracy(per_token=True)
        print(f"  {label:<10} by summed log-prob {percent(*by_sum)}, per token {percent(*by_token)}")
    implicit = after.accuracy(reference=before)
    print(f"  DPO's implicit reward (log-ratio against the start) ranks {percent(*implicit)} of them right")
    # By kind (examples/world/README.md): the model starts at the ceiling on facts and real names, at
    # chance on unseen sums; the pairs about people and places the world does not have are the ones
    # DPO has to move.
    assert list(before.index) == list(after.index)
    held_rows = [r for r, h in zip(rows, held, strict=True) if h]
    kinds = [held_rows[i]["meta"]["kind"] for i in after.index]
    for kind in ("fact", "arithmetic", "unknown", "known"):
        picks = [i for i, k in enumerate(kinds) if k == kind]
        if not picks:
            continue
        cells = []
        for scores in (before, after):
            p = sum(bool(scores.chosen[i] > scores.rejected[i]) for i in picks) / len(picks)
            cells.append(percent(p, math.sqrt(p * (1 - p) / len(picks))))
        print(f"  {kind:<10} ({len(picks):>3} pairs) by summed log-prob: {cells[0]} before, {cells[1]} after")
    llm = LLM(run / "final", dtype=torch.float32)
    try:
        result = evaluate(
            llm, ["world_heldout_statements"], data_dir=world_dir, model_name="default model + DPO",
            output_dir=out / "eval-dpo", use_tqdm=False,
        )  # fmt: skip
    finally:
        llm.close()
    statements = result.tasks["world_heldout_statements"].metrics["acc"]
    score = percent(statements.value, statements.stderr)
    print(f"  closed-book held-out facts after DPO, by answer statements: {score}")
    print(f"step 11 took {time.perf_counter() - start:.0f} s")


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

    if args.model is None and not args.resume:
        # A fresh run evaluates afresh: the answer cache is kept only for --model and --resume runs.
        shutil.rmtree(args.out / "eval", ignore_errors=True)
    path = args.model or build_default_model(args.out, resume=args.resume)
    load_and_check(path)
    llm = LLM(path, dtype=torch.float32)
    z_statements = 0.0
    try:
        world_dir, eval_dir = args.out / "world", args.out / "eval"
        name = "default model" if args.model is None else str(args.model)
        if args.model is None or (world_dir / "heldout.jsonl").is_file():
            z_statements = evaluate_world(llm, name, world_dir, eval_dir)
            needle_in_a_haystack(llm, name, world_dir, eval_dir)
        else:
            print(f"\n(no world in {world_dir}: skipping steps 4-5, the evaluation on the world)")
        generate_with_infer(llm)
        if (world_dir / "articles.jsonl").is_file():
            answer_from_documents(llm, name, world_dir, args.out)
    finally:
        llm.close()
    serve_and_query(path)
    if (args.out / "world" / "articles.jsonl").is_file():
        graph_search(path, args.out / "world")
    if (args.out / "world" / "heldout.jsonl").is_file():
        quantize_and_export(path, args.out / "world", args.out)
    if (args.out / "world" / "preferences.jsonl").is_file():
        align_with_dpo(path, args.out / "world", args.out)
    print(f"\nquickstart finished in {time.perf_counter() - started:.0f} s")
    # The default model must know the facts it read: held-out accuracy by answer statements at least
    # MIN_Z standard errors above guessing (about 48% against 25% chance on the world's 55 questions).
    if args.model is None and z_statements < MIN_Z:
        sys.exit(
            f"error: the default model answered the held-out facts at z = {z_statements:+.1f} by answer "
            f"statements, not {MIN_Z} standard errors above chance: training did not work"
        )


if __name__ == "__main__":
    main()
