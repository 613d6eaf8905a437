"""The runner's gaps: token perplexity, groups in results, repeats, and chat-template tasks end to end."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from lm_eval.api.metrics import pooled_sample_stderr

from lmstack.eval import EvalError, evaluate, rescore
from lmstack.eval.tasks import MetricConfig
from lmstack.infer import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(model_dir: Path):
    model = LLM(model_dir)
    yield model
    model.close()


def test_token_perplexity_from_the_tokenizer(llm: LLM, tmp_path: Path, task_files: dict[str, Path]) -> None:
    path = task_files["rolling"]
    path.write_text(path.read_text().replace("{metric: bits_per_byte}", "{metric: token_perplexity}"))
    out = tmp_path / "run"
    result = evaluate(llm, str(path), output_dir=out, use_tqdm=False)
    texts = [json.loads(line)["text"] for line in (path.parent / "text.jsonl").read_text().splitlines()]
    lls = llm.loglikelihood_rolling(texts, use_tqdm=False)
    # What the model scores: every token of the text as encoded with its special tokens (a bos, here).
    counts = [len(llm.tokenizer.encode(text, add_special_tokens=True)) for text in texts]
    assert [s["num_tokens"] for s in result.tasks["toy_ppl"].samples] == counts
    want = math.exp(-math.fsum(lls) / sum(counts))
    assert result.score("toy_ppl", "token_perplexity") == pytest.approx(want, rel=1e-6)
    # Rescoring: with the tokenizer it counts again; without, it names what is missing.
    again = rescore(str(path), out / "cache.sqlite", tokenizer=llm.tokenizer)
    assert again.score("toy_ppl", "token_perplexity") == result.score("toy_ppl", "token_perplexity")
    with pytest.raises(EvalError, match="token count"):
        rescore(str(path), out / "cache.sqlite")
    # Answers without counts stay readable for every other metric.
    path.write_text(path.read_text().replace("{metric: token_perplexity}", "{metric: bits_per_byte}"))
    bpb = rescore(str(path), out / "cache.sqlite").score("toy_ppl", "bits_per_byte")
    assert bpb == pytest.approx(-math.fsum(lls) / sum(len(t.encode()) for t in texts) / math.log(2), rel=1e-6)


def test_recorded_token_count_wins(task_files: dict[str, Path]) -> None:
    from lmstack.eval.runner import resolve_metrics, score_task
    from lmstack.eval.tasks import load_task

    task = load_task(task_files["rolling"])
    task = type(task)(task.config.replace(metrics=(MetricConfig("token_perplexity"),)))
    requests = task.build_requests(limit=2)
    answers = [{"loglikelihood": -10.0, "num_tokens": 5}, {"loglikelihood": -20.0, "num_tokens": 15}]
    scored = score_task(task, requests, answers, resolve_metrics(task), doc_ids=[0, 1])
    assert scored.scores["token_perplexity"].value == pytest.approx(math.exp(30 / 20))


def _group_yaml(path: Path, name: str, members: list[str], weight_by_size: bool) -> str:
    listed = ", ".join(members)
    path.write_text(
        f"group: {name}\ntask: [{listed}]\naggregate_metric_list:\n"
        f"  - {{metric: acc, weight_by_size: {str(weight_by_size).lower()}}}\n"
    )
    return str(path)


def test_group_scores_in_results(llm: LLM, tmp_path: Path, task_files: dict[str, Path]) -> None:
    mc = task_files["mc"]
    small = mc.parent / "mc_small.yaml"  # a second member of another size
    small.write_text(mc.read_text().replace("toy_mc", "toy_mc_small") + "tag: toys\n")
    mc.write_text(mc.read_text() + "tag: toys\n")
    micro = _group_yaml(mc.parent / "micro.yaml", "toys_micro", ["toys"], True)
    macro = _group_yaml(mc.parent / "macro.yaml", "toys_macro", ["toy_mc", "mc_small.yaml"], False)
    out = tmp_path / "run"
    result = evaluate(llm, [micro, macro], output_dir=out, use_tqdm=False)
    assert set(result.tasks) == {"toy_mc", "toy_mc_small"}  # shared by both groups, run once
    per_task = {name: [s["metrics"]["acc"] for s in t.samples] for name, t in result.tasks.items()}
    everything = [v for values in per_task.values() for v in values]
    got_micro = result.groups["toys_micro"].metrics["acc"]
    assert got_micro.value == pytest.approx(sum(everything) / len(everything))
    assert got_micro.n == len(everything)
    stderrs = [result.tasks[n].metrics["acc"].stderr for n in per_task]
    sizes = [len(v) for v in per_task.values()]
    assert got_micro.stderr == pytest.approx(pooled_sample_stderr(stderrs, sizes))
    got_macro = result.groups["toys_macro"].metrics["acc"]
    accs = [sum(v) / len(v) for v in per_task.values()]
    assert got_macro.value == pytest.approx(sum(accs) / 2)
    assert got_macro.stderr == pytest.approx(math.sqrt(sum(s**2 for s in stderrs)) / 2)
    doc = json.loads((out / "results.json").read_text())
    assert doc["groups"]["toys_micro"]["members"] == ["toy_mc", "toy_mc_small"]
    assert doc["groups"]["toys_micro"]["metrics"]["acc"]["weighting"] == "micro"
    assert doc["groups"]["toys_macro"]["metrics"]["acc"]["value"] == pytest.approx(got_macro.value)
    table = (out / "results.md").read_text()
    assert "| toys_micro (micro) | acc |" in table and "| toys_macro (macro) | acc |" in table
    rescored = rescore([micro, macro], out / "cache.sqlite")
    assert rescored.groups["toys_micro"].metrics == result.groups["toys_micro"].metrics
    # A member without the averaged metric is named.
    bad = _group_yaml(mc.parent / "bad.yaml", "bad", ["toy_gen"], True)
    with pytest.raises(EvalError, match="toy_gen"):
        evaluate(llm, [str(task_files["gen"]), bad], use_tqdm=False)


def test_repeats_generate_n_and_score_the_first(llm: LLM, task_files: dict[str, Path]) -> None:
    path = task_files["gen"]
    path.write_text(
        path.read_text().replace("do_sample: false", "do_sample: true\n  temperature: 1.0") + "repeats: 3\n"
    )
    result = evaluate(llm, str(path), use_tqdm=False)
    samples = result.tasks["toy_gen"].samples
    assert all(len(s["answers"][0]["texts"]) == 3 for s in samples)
    assert any(len(set(s["answers"][0]["texts"])) > 1 for s in samples)  # sampled, not copies
    firsts = [s["answers"][0]["texts"][0].strip().lower() == s["target"].strip().lower() for s in samples]
    assert result.score("toy_gen", "exact_match") == pytest.approx(sum(firsts) / len(firsts))


# ------------------------------------------------------------------ chat-template tasks

CHAT_SYSTEM = "You answer with one of the choices."


def _chat_tasks(tmp_path: Path, make_sentence, write_rows) -> tuple[Path, Path]:
    rng = random.Random(5)
    rows = [
        {
            "question": make_sentence(rng),
            "choices": [make_sentence(rng, 1, 3) for _ in range(3)],
            "label": i % 3,
        }
        for i in range(8)
    ]
    write_rows(tmp_path / "chat.jsonl", rows)
    common = (
        "dataset: {format: jsonl, data_files: {test: chat.jsonl}}\n"
        'doc_to_text: "Q: {{question}}"\nnum_fewshot: 2\n'
        f"chat: {{system_prompt: {CHAT_SYSTEM!r}, fewshot_as_multiturn: true}}\n"
    )
    mc = tmp_path / "chat_mc.yaml"
    mc.write_text(
        "name: chat_mc\noutput_type: multiple_choice\ndoc_to_target: label\ndoc_to_choice: choices\n" + common
    )
    gen = tmp_path / "chat_gen.yaml"
    gen.write_text(
        "name: chat_gen\noutput_type: generate_until\ndoc_to_target: '{{choices[label]}}'\n"
        "generation: {until: ['\\n'], max_gen_toks: 6}\n" + common
    )
    return mc, gen


def _by_hand_messages(task, doc_id: int) -> list[dict[str, str]]:
    """The conversation built independently of lmstack's prompt code, from the rows and the rules."""
    messages = [{"role": "system", "content": CHAT_SYSTEM}]
    for example in task.fewshot_examples(doc_id):
        messages.append({"role": "user", "content": f"Q: {example['question']}"})
        messages.append({"role": "assistant", "content": example["choices"][example["label"]]})
    messages.append({"role": "user", "content": f"Q: {task.docs[doc_id]['question']}"})
    return messages


def test_chat_tasks_match_the_chat_template_by_hand(
    llm: LLM, tmp_path: Path, make_sentence, write_rows
) -> None:
    from lmstack.eval.tasks import load_task

    mc, gen = _chat_tasks(tmp_path, make_sentence, write_rows)
    result = evaluate(llm, [str(mc), str(gen)], use_tqdm=False)
    task = load_task(mc)
    for sample in result.tasks["chat_mc"].samples:
        messages = _by_hand_messages(task, sample["doc_id"])
        assert sample["prompt"] == messages
        rendered = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        assert CHAT_SYSTEM in rendered and rendered != messages[-1]["content"]
        choices = task.docs[sample["doc_id"]]["choices"]
        # The choice follows the assistant's opening directly (no target delimiter), as lm-eval.
        want = [ll for ll, _ in llm.loglikelihood([(rendered, c) for c in choices], use_tqdm=False)]
        assert sample["loglikelihoods"] == pytest.approx(want, abs=1e-5)
    gen_task = load_task(gen)
    samples = result.tasks["chat_gen"].samples
    conversations = [_by_hand_messages(gen_task, s["doc_id"]) for s in samples]
    replies = llm.chat(
        conversations, SamplingParams(max_tokens=6, temperature=0.0, stop=["\n"]), use_tqdm=False
    )
    assert [s["answers"][0]["texts"][0] for s in samples] == [r.outputs[0].text for r in replies]


def test_chat_multiple_choice_matches_lm_eval_apply_chat_template(
    model_dir: Path, tmp_path: Path, make_sentence, write_rows, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lm-eval ``--apply_chat_template --fewshot_as_multiturn --system_instruction`` on the same model
    (its tokenizer's chat template, read by transformers) gives the same per-sample log-likelihoods."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lmstack.eval.tasks import ChatConfig, Task, load_task_config

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    rng = random.Random(7)
    for split, count in (("test", 10), ("dev", 3)):
        rows = [
            {
                "question": make_sentence(rng),
                "choices": [make_sentence(rng, 1, 3) for _ in range(3)],
                "label": i % 3,
            }
            for i in range(count)
        ]
        write_rows(tmp_path / f"{split}.jsonl", rows)
    (tmp_path / "chat_mc.yaml").write_text(
        "task: chat_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files: {{test: {tmp_path / 'test.jsonl'}, dev: {tmp_path / 'dev.jsonl'}}}\n"
        "test_split: test\nfewshot_split: dev\nfewshot_config: {sampler: first_n}\nnum_fewshot: 2\n"
        'output_type: multiple_choice\ndoc_to_text: "Q: {{question}}"\ndoc_to_target: label\n'
        "doc_to_choice: choices\nmetric_list: [{metric: acc}]\n"
    )
    reference = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=["chat_mc"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        batch_size=4,
        device="cpu",
        log_samples=True,
        apply_chat_template=True,
        fewshot_as_multiturn=True,
        system_instruction=CHAT_SYSTEM,
    )
    config = load_task_config(tmp_path / "chat_mc.yaml")
    task = Task(config.replace(chat=ChatConfig(system_prompt=CHAT_SYSTEM, fewshot_as_multiturn=True)))
    llm = LLM(model_dir, dtype="float32")
    try:
        ours = evaluate(llm, [task], use_tqdm=False)
    finally:
        llm.close()
    theirs = sorted(reference["samples"]["chat_mc"], key=lambda s: s["doc_id"])
    mine = ours.tasks["chat_mc"].samples
    assert len(theirs) == len(mine) == 10
    for sample, record in zip(theirs, mine, strict=True):
        assert sample["doc_id"] == record["doc_id"]
        assert CHAT_SYSTEM in str(sample["arguments"][0][0])  # the chat-rendered context
        lls = [float(resp[0][0]) for resp in sample["resps"]]
        assert record["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
    assert ours.score("chat_mc", "acc") == pytest.approx(reference["results"]["chat_mc"]["acc,none"])
