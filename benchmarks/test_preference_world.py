"""Preference alignment on the bundled world: DPO (sigmoid) and ORPO on the trained default model.

In one run, on the quickstart's default model (an earlier ``out/quickstart`` run,
``PREF_BENCH_MODEL``/``PREF_BENCH_WORLD``, or trained here):

* the world is generated afresh (same seed and parameters as the model's world, the current generator)
  into this run's folder, and its ``pretrain.jsonl``, ``chats.jsonl`` (what the default model was
  trained on: ``examples/configs/default_model.yaml``) and ``heldout.jsonl`` are checked byte-identical
  to the model's world, so a model trained before the world gained its ``unknown`` preference pairs is
  measured on today's ``preferences.jsonl`` without retraining;
* the world's ``preferences.jsonl`` is split by a hash of each row's id into a training split (~85%)
  and a **held-out split** (~15%), never trained on. Its pairs come in four kinds, reported apart with
  their counts: ``fact`` (right value against another entity's), ``arithmetic`` (right sum against one
  off by a little), ``unknown`` (a question about a person or place the world does not have: "...
  is not known" against a made-up fact; every held-out name is a name no training pair, article or
  chat mentions) and ``known`` (an asked fact of a real person or place against that denial);
* a stricter **held-out facts** set is built from the closed-book held-out questions: the question as a
  user turn, chosen = an answer statement with the right value, rejected = the same sentence template
  with a wrong value (every template, every wrong value). These facts appear only in the articles, never
  in a preference or a chat, so this set asks whether preference training generalises;
* a **real names** set checks that the model did not simply learn to deny everything: the held-out
  questions about real people and cities, chosen = the right answer statement, rejected = the
  ``unknown`` pairs' "not known" reply with that (real) name;
* **preference accuracy** of a model on a set of pairs is the share of pairs whose chosen completion has
  the higher summed log-prob (rendered through the chat template as training renders them: the
  recipes' :class:`~lmstack.train.data.PreferenceTokenizer`), also length-normalised (mean log-prob a
  token), and for DPO the implicit-reward accuracy ``β(logπ-logπ_ref)`` chosen > rejected, which is what
  DPO optimises (the reference is the model before training, as in the recipe);
* **closed-book accuracy** (lmstack-eval's ``world_heldout_mc`` and ``world_heldout_statements``) before
  and after, with standard errors, and, stricter, beside them: ``world_heldout_greedy`` (the greedy reply
  names the answer) and the **greedy denial** rates (the greedy reply is exactly one of the denials of
  the asked name) on the held-out ``unknown`` questions and on the closed-book questions about real
  names;
* DPO runs from ``examples/configs/dpo_world.yaml`` (its paths replaced by this run's), ORPO with the same
  data, optimiser and steps.

Figures go to stdout (two Markdown tables, then each goal met or not) and
``.benchmarks/preference_world.json``.

Issue 16 asks that preference accuracy on held-out pairs rise and closed-book accuracy drop by no more
than its standard error. Asserted for DPO and ORPO: summed log-prob accuracy on the held-out ``unknown``
pairs rises by more than two standard errors (of the difference of the two proportions); on the held-out
``fact`` and ``known`` pairs and the real names it falls by no more than its standard error; neither
closed-book accuracy drops by more than its standard error. Everything else is printed as a goal, met or
not, among them DPO's implicit-reward accuracy on the held-out facts above chance.

Status (one run, the default model, ``dpo_world.yaml``: beta 0.05, lr 1e-5, 300 steps of 8 bins): held-out
``unknown`` pairs 20.6 ± 4.1% before, 51.5 ± 5.1% after DPO (implicit reward 100%), 64.9 ± 4.8% after
ORPO (97 pairs); ``world_heldout_mc`` 47.3 -> 43.6 (DPO) and 47.3 (ORPO), stderr 6.8;
``world_heldout_statements`` 94.5 -> 92.7 and 96.4, stderr 3.1; the ``fact`` and ``known`` pairs and the
real names stay at 100%. The settings were chosen among eight DPO runs (in the lmstack-train README):
faster ones moved more ``unknown`` pairs but cost closed-book accuracy. What the likelihoods do not
show: the greedy replies. No greedy reply denies, before or after (0% on the ``unknown`` questions):
asked about a stranger, this 3.6M model answers with a fact about a real entity it knows (it never
copies a name it has never seen), so its preference between two replies that both name the stranger
moved, its behaviour did not.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lmstack.core import Tokenizer, load_pretrained
from lmstack.eval import evaluate
from lmstack.infer import LLM, SamplingParams
from lmstack.train import DataConfig, load_train_config
from lmstack.train.data import PreferenceTokenizer, iter_preference_samples
from lmstack.train.recipes import DPOConfig, ORPOConfig, dpo, orpo

sys.path.insert(0, str(Path(__file__).parent))
import _world_model as wm

REPO = Path(__file__).resolve().parents[1]
DPO_CONFIG = REPO / "examples" / "configs" / "dpo_world.yaml"
HELDOUT_PERCENT = 15
ORPO_BETA = 0.1
CLOSED_BOOK = ("world_heldout_mc", "world_heldout_statements")
GREEDY_BOOK = "world_heldout_greedy"
"""Reported beside the closed-book likelihoods, not asserted: the greedy reply names the right value."""
GREEDY_TOKENS = 24
SCORE_BATCH = 32
CHECK_PAIRS = 8
KINDS = ("fact", "arithmetic", "unknown", "known")
"""The kinds of ``preferences.jsonl`` pairs (``meta.kind``), reported apart."""
TRAINED_ON = ("pretrain.jsonl", "chats.jsonl", "heldout.jsonl")
"""The world files the default model was trained (or is scored) on: a regenerated world must keep them."""


def _heldout(row_id: str) -> bool:
    """A row is held out when the hash of its id falls in the lowest ``HELDOUT_PERCENT`` of 100 buckets."""
    return int(hashlib.sha256(row_id.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _fact_pairs(world_dir: Path) -> list[dict[str, Any]]:
    """Pairs on the closed-book held-out facts: right vs wrong value in the same sentence template."""
    pairs: list[dict[str, Any]] = []
    for row in wm.world.read_jsonl(world_dir / "heldout.jsonl"):
        if row["kind"] != "fact":
            continue
        right = row["statements"][row["label"]]
        for wrong in (s for k, s in enumerate(row["statements"]) if k != row["label"]):
            for chosen, rejected in zip(right, wrong, strict=True):
                pairs.append(
                    {
                        "id": f"{row['id']}-{len(pairs)}",
                        "prompt": [{"role": "user", "content": row["question"]}],
                        "chosen": chosen,
                        "rejected": rejected,
                    }
                )
    return pairs


def _real_name_questions(world_dir: Path) -> list[tuple[dict[str, Any], str, str]]:
    """Held-out closed-book questions about real people and cities: (row, the entity's name, its kind)."""
    names = {r["id"]: r["title"] for r in wm.world.read_jsonl(world_dir / "articles.jsonl")}
    found = []
    for row in wm.world.read_jsonl(world_dir / "heldout.jsonl"):
        kind = wm.world.ATTRIBUTE[row["attribute"]].kind if row["kind"] == "fact" else None
        if kind in wm.world.UNKNOWN_ANSWERS:
            found.append((row, names[row["entity"]], kind))
    return found


def _real_name_pairs(world_dir: Path) -> list[dict[str, Any]]:
    """Pairs on the held-out questions about real people and cities: the right statement vs "not known"."""
    pairs: list[dict[str, Any]] = []
    for row, name, kind in _real_name_questions(world_dir):
        refusals = wm.world.UNKNOWN_ANSWERS[kind]
        for chosen, refusal in zip(row["statements"][row["label"]], refusals, strict=True):
            pairs.append(
                {
                    "id": f"{row['id']}-{len(pairs)}",
                    "prompt": [{"role": "user", "content": row["question"]}],
                    "chosen": chosen,
                    "rejected": refusal.format(name=name),
                }
            )
    return pairs


def _fresh_world(world_dir: Path, out: Path) -> Path:
    """The model's world regenerated by today's generator, checked to hold what the model was trained on."""
    manifest = wm.world.read_manifest(world_dir)
    assert manifest is not None, f"{world_dir} has no manifest.json"
    params = {k: v for k, v in manifest["params"].items() if k != "num_entities"}
    wm.world.generate(out, seed=manifest["seed"], num_entities=manifest["params"]["num_entities"], **params)
    for name in TRAINED_ON:
        same = (out / name).read_bytes() == (world_dir / name).read_bytes()
        assert same, f"regenerated {name} differs from {world_dir / name}: retrain the default model"
    return out


@dataclass
class PairLogProbs:
    """Summed completion log-probs and completion lengths (tokens) of each pair's chosen and rejected."""

    chosen: np.ndarray
    rejected: np.ndarray
    chosen_tokens: np.ndarray
    rejected_tokens: np.ndarray


@torch.no_grad()
def _score(model_dir: Path, pairs_file: Path) -> PairLogProbs:
    """Log-probs of every pair's completions, tokenized exactly as the preference recipes tokenize them."""
    tokenizer = Tokenizer.from_pretrained(model_dir)
    model = load_pretrained(model_dir, dtype=torch.float32).eval()
    samples = list(iter_preference_samples([pairs_file], DataConfig(format="preference")))
    tokenized = PreferenceTokenizer(tokenizer)(samples)
    seqs = [(t.prompt_ids, t.completion_ids[k]) for t in tokenized for k in (0, 1)]
    sums: list[float] = []
    for at in range(0, len(seqs), SCORE_BATCH):
        batch = seqs[at : at + SCORE_BATCH]
        ids = [np.concatenate([p, c]) for p, c in batch]
        width = max(len(x) for x in ids)
        # Right padding: a causal model's logits before the padding do not depend on it.
        padded = torch.zeros(len(ids), width, dtype=torch.long)
        for i, x in enumerate(ids):
            padded[i, : len(x)] = torch.from_numpy(x.astype(np.int64))
        logp = torch.log_softmax(model(padded).float(), -1)
        for i, (p, c) in enumerate(batch):
            start, end = len(p), len(p) + len(c)
            targets = padded[i, start:end]
            sums.append(float(logp[i, start - 1 : end - 1].gather(-1, targets[:, None]).sum()))
    lengths = np.array([len(c) for _, c in seqs], dtype=np.float64)
    s = np.array(sums)
    return PairLogProbs(s[0::2], s[1::2], lengths[0::2], lengths[1::2])


@torch.no_grad()
def _transformers_logps(model_dir: Path, rows: list[dict[str, Any]]) -> np.ndarray:
    """An independent check of :func:`_score`: transformers' model and chat template, one sequence a call.

    Returns ``[chosen, rejected, chosen, ...]`` summed completion log-probs of ``rows``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for row in rows:
        prompt = str(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False))
        n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        for completion in (row["chosen"], row["rejected"]):
            turns = [*row["prompt"], {"role": "assistant", "content": completion}]
            text = str(tokenizer.apply_chat_template(turns, tokenize=False)).rstrip()
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            out.append(float(logp[n - 1 :].gather(-1, ids[0, n:, None]).sum()))
    return np.array(out)


def _rate(wins: np.ndarray) -> dict[str, float]:
    p, n = float(wins.mean()), int(wins.size)
    return {"acc": p, "stderr": math.sqrt(p * (1 - p) / n), "n": n}


def _subset(lp: PairLogProbs, mask: np.ndarray) -> PairLogProbs:
    return PairLogProbs(lp.chosen[mask], lp.rejected[mask], lp.chosen_tokens[mask], lp.rejected_tokens[mask])


def _accuracies(lp: PairLogProbs, ref: PairLogProbs | None = None, beta: float = 0.0) -> dict[str, Any]:
    out: dict[str, Any] = {
        "logp": _rate(lp.chosen > lp.rejected),
        "logp/token": _rate(lp.chosen / lp.chosen_tokens > lp.rejected / lp.rejected_tokens),
        # How far the summed log-probs are from flipping: accuracy only moves when this crosses 0.
        "mean margin": float((lp.chosen - lp.rejected).mean()),
    }
    if ref is not None:
        # DPO's implicit reward margin; 0 (a tie, counted as a miss) for the reference itself.
        margin = beta * ((lp.chosen - ref.chosen) - (lp.rejected - ref.rejected))
        out["implicit reward"] = _rate(margin > 0)
    return out


def _results(
    scores: dict[str, PairLogProbs], kinds: np.ndarray, ref: dict[str, PairLogProbs] | None, beta: float
) -> dict[str, Any]:
    """Accuracies on every held-out set, and on each kind of the split's pairs apart."""
    out = {k: _accuracies(v, None if ref is None else ref[k], beta) for k, v in scores.items()}
    for kind in KINDS:
        mask = kinds == kind
        if mask.any():
            sub_ref = None if ref is None else _subset(ref["split"], mask)
            out[f"split {kind}"] = _accuracies(_subset(scores["split"], mask), sub_ref, beta)
    return out


def _rise(before: dict[str, float], after: dict[str, float]) -> tuple[float, float]:
    """(after - before, the standard error of that difference, as of two independent proportions)."""
    return after["acc"] - before["acc"], math.sqrt(before["stderr"] ** 2 + after["stderr"] ** 2)


def _denial_questions(world_dir: Path, split: list[dict[str, Any]]) -> dict[str, list[tuple[Any, set[str]]]]:
    """Questions to answer greedily, each with the exact denials (``UNKNOWN_ANSWERS`` with its name).

    ``unknown``: the held-out split's unknown pairs' prompts; ``real names``: each held-out closed-book
    question about a real person or city, once.
    """
    answers = wm.world.UNKNOWN_ANSWERS
    unknown = [
        (
            r["prompt"],
            {
                t.format(name=r["meta"]["name"])
                for t in answers[wm.world.ATTRIBUTE[r["meta"]["attribute"]].kind]
            },
        )
        for r in split
        if r["meta"]["kind"] == "unknown"
    ]
    real = [
        ([{"role": "user", "content": row["question"]}], {t.format(name=name) for t in answers[kind]})
        for row, name, kind in _real_name_questions(world_dir)
    ]
    return {"unknown": unknown, "real names": real}


def _closed_book(
    model_dir: Path, world_dir: Path, out: Path, name: str, denials: dict[str, list[tuple[Any, set[str]]]]
) -> dict[str, dict[str, float]]:
    """Closed-book accuracy (likelihoods and greedy replies), and how often greedy replies are a denial."""
    llm = LLM(model_dir, dtype=torch.float32)
    try:
        kwargs: dict[str, Any] = {"cache": None, "model_name": name, "use_tqdm": False}
        result = evaluate(llm, [*CLOSED_BOOK, GREEDY_BOOK], data_dir=world_dir, output_dir=out, **kwargs)
        params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS)
        denied: dict[str, dict[str, float]] = {}
        for label, questions in denials.items():
            replies = llm.chat([q for q, _ in questions], params, use_tqdm=False)
            hits = np.array(
                [o.outputs[0].text.strip() in d for o, (_, d) in zip(replies, questions, strict=True)]
            )
            denied[f"greedy denial: {label}"] = _rate(hits)
    finally:
        llm.close()
    book = {
        task: {"acc": m.value, "stderr": float(m.stderr or 0.0), "n": m.n}
        for task in CLOSED_BOOK
        for m in [result.tasks[task].metrics["acc"]]
    }
    greedy = result.tasks[GREEDY_BOOK].metrics["contains"]  # the reply names the answer value
    book[GREEDY_BOOK] = {"acc": greedy.value, "stderr": float(greedy.stderr or 0.0), "n": greedy.n}
    return {**book, **denied}


def _pct(r: dict[str, float]) -> str:
    return f"{100 * r['acc']:.1f} ± {100 * r['stderr']:.1f}"


def _table(f: dict[str, Any]) -> str:
    models = ["before", *f["methods"]]
    rows = [
        "| model | train s | held-out split: logp | (its facts) | (its arithmetic) | logp/token "
        "| implicit reward "
        "| held-out facts: logp | logp/token | implicit reward "
        "| world_heldout_mc | world_heldout_statements | world_heldout_greedy "
        "| greedy denial: unknown | greedy denial: real names |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in models:
        r = f["results"][m]
        cells = [m, "-" if m == "before" else f"{f['methods'][m]['seconds']:.0f}"]
        for split in ("split", "facts"):
            acc = r[split]
            cells.append(_pct(acc["logp"]))
            if split == "split":
                cells += [_pct(r["split fact"]["logp"]), _pct(r["split arithmetic"]["logp"])]
            cells.append(_pct(acc["logp/token"]))
            cells.append(_pct(acc["implicit reward"]) if "implicit reward" in acc else "-")
        extra = (GREEDY_BOOK, "greedy denial: unknown", "greedy denial: real names")
        cells += [_pct(r["closed book"][t]) for t in (*CLOSED_BOOK, *extra)]
        rows.append("| " + " | ".join(cells) + " |")
    n_split, n_facts = f["pairs"]["held-out split"], f["pairs"]["held-out facts"]
    n_book = f["results"]["before"]["closed book"][CLOSED_BOOK[0]]["n"]
    rows.append(
        f"\naccuracy in % ± standard error; held-out split n = {n_split} pairs, held-out facts n = {n_facts} "
        f"pairs ({f['facts']} questions), closed book n = {n_book} questions; "
        f"trained on {f['pairs']['train']} pairs; greedy denial: the share of greedy replies "
        f"({GREEDY_TOKENS} tokens at most) that are exactly one of the unknown pairs' denials of the "
        "asked name, to the held-out unknown pairs' questions and to the closed-book questions about real "
        "people and cities"
    )
    return "\n".join(rows)


def _kind_table(f: dict[str, Any]) -> str:
    """Held-out split by kind (and the real-names set): each model's accuracies, with pair counts."""
    models = ["before", *f["methods"]]
    sets = [f"split {k}" for k in KINDS if f"split {k}" in f["results"]["before"]] + ["real names"]
    rows = [
        "| held-out pairs | n | model | logp | logp/token | implicit reward | mean logp margin (nats) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in sets:
        for m in models:
            acc = f["results"][m][name]
            implicit = _pct(acc["implicit reward"]) if "implicit reward" in acc else "-"
            cells = [name, str(acc["logp"]["n"]), m, _pct(acc["logp"]), _pct(acc["logp/token"]), implicit]
            cells.append(f"{acc['mean margin']:+.1f}")
            rows.append("| " + " | ".join(cells) + " |")
    rows.append(
        "\nsplit <kind>: the held-out split's pairs of that kind (train split: "
        + ", ".join(f"{n} {k}" for k, n in f["pairs"]["train by kind"].items())
        + "); real names: held-out questions about real people and cities, the right statement "
        "against the unknown pairs' 'not known' reply; mean logp margin: summed log-prob of chosen minus "
        "rejected, averaged over the pairs (logp accuracy counts the pairs where it is above 0)"
    )
    return "\n".join(rows)


@pytest.mark.benchmark
def test_preference_alignment_on_world(benchmark: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("pref")
    model_dir, model_world, source = wm.default_model(tmp, env_prefix="PREF_BENCH")
    world_dir = _fresh_world(model_world, tmp / "world-now")
    rows = wm.world.read_jsonl(world_dir / "preferences.jsonl")
    train_rows = [r for r in rows if not _heldout(r["id"])]
    train_file = _write_jsonl(tmp / "train.jsonl", train_rows)
    split = [r for r in rows if _heldout(r["id"])]
    split_file = _write_jsonl(tmp / "heldout_split.jsonl", split)
    kinds = np.array([r["meta"]["kind"] for r in split])
    facts = _fact_pairs(world_dir)
    facts_file = _write_jsonl(tmp / "heldout_facts.jsonl", facts)
    real_names = _real_name_pairs(world_dir)
    names_file = _write_jsonl(tmp / "real_names.jsonl", real_names)
    # No held-out unknown name is in a training pair (each name is asked once in the world).
    trained_names = {r["meta"]["name"] for r in train_rows if r["meta"]["kind"] == "unknown"}
    assert not trained_names & {r["meta"]["name"] for r in split if r["meta"]["kind"] == "unknown"}
    n_train = len(train_rows)
    f: dict[str, Any] = {
        "model": source,
        "pairs": {
            "train": n_train,
            "train by kind": {k: sum(r["meta"]["kind"] == k for r in train_rows) for k in KINDS},
            "held-out split": len(rows) - n_train,
            "held-out split by kind": {k: int((kinds == k).sum()) for k in KINDS},
            "held-out facts": len(facts),
            "real names": len(real_names),
        },
        "facts": len({p["id"].rsplit("-", 1)[0] for p in facts}),
        "methods": {},
        "results": {},
    }
    overrides = [
        "--model", str(model_dir),
        "--data.paths", str(train_file),
        "--data.cache_dir", str(tmp / "cache"),
        "--run.tensorboard", "false",
    ]  # fmt: skip
    dpo_cfg = load_train_config(DPOConfig, DPO_CONFIG, [*overrides, "--run.output_dir", str(tmp / "dpo")])
    beta = dpo_cfg.dpo.beta
    orpo_cfg = ORPOConfig(
        model=str(model_dir),
        data=dpo_cfg.data,
        optim=dpo_cfg.optim,
        run=load_train_config(DPOConfig, DPO_CONFIG, [*overrides, "--run.output_dir", str(tmp / "orpo")]).run,
    )
    orpo_cfg.orpo.beta = ORPO_BETA

    denials = _denial_questions(world_dir, split)

    def measure() -> None:
        sets = {"split": split_file, "facts": facts_file, "real names": names_file}
        ref = {k: _score(model_dir, v) for k, v in sets.items()}
        # The batched scorer agrees with transformers on the first pairs (chat template, forward, sums).
        check = _transformers_logps(model_dir, split[:CHECK_PAIRS])
        ours = np.stack([ref["split"].chosen, ref["split"].rejected], 1)[:CHECK_PAIRS].reshape(-1)
        f["scorer max |diff| vs transformers"] = float(np.abs(check - ours).max())
        f["results"]["before"] = _results(ref, kinds, None, beta)
        book = _closed_book(model_dir, world_dir, tmp / "eval-before", "before", denials)
        f["results"]["before"]["closed book"] = book
        for name, run in (("dpo", lambda: dpo(dpo_cfg)), ("orpo", lambda: orpo(orpo_cfg))):
            start = time.perf_counter()
            result = run()
            seconds = time.perf_counter() - start
            assert result.model_dir is not None and result.metrics_file is not None
            trained = Path(result.model_dir)
            metrics = [json.loads(line) for line in Path(result.metrics_file).read_text().splitlines()]
            f["methods"][name] = {
                "seconds": seconds,
                "steps": result.steps,
                "final loss": result.final_loss,
                "last logged": metrics[-1],
            }
            scores = {k: _score(trained, v) for k, v in sets.items()}
            f["results"][name] = _results(scores, kinds, ref if name == "dpo" else None, beta)
            book = _closed_book(trained, world_dir, tmp / f"eval-{name}", name, denials)
            f["results"][name]["closed book"] = book

    benchmark.pedantic(measure, rounds=1, iterations=1)
    f["config"] = {
        "dpo": {"beta": beta, "loss": dpo_cfg.dpo.loss},
        "orpo": {"beta": ORPO_BETA},
        "optim": {"lr": dpo_cfg.optim.lr, "warmup_steps": dpo_cfg.optim.warmup_steps},
        "run": {"max_steps": dpo_cfg.run.max_steps, "batch_size": dpo_cfg.run.batch_size},
        "data": {"max_length": dpo_cfg.data.max_length, "pack": dpo_cfg.data.pack},
    }
    out = Path(os.environ.get("LMSTACK_BENCH_DIR", REPO / ".benchmarks"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"\nmodel: {source}; config: {json.dumps(f['config'])}\n")
    print(_table(f))
    print()
    print(_kind_table(f))
    before = f["results"]["before"]
    goals: dict[str, bool] = {}
    for name in f["methods"]:
        after = f["results"][name]
        rise, stderr = _rise(before["split unknown"]["logp"], after["split unknown"]["logp"])
        goals[f"{name}: held-out unknown-pair accuracy rises by more than 2 stderr"] = rise > 2 * stderr
        for kind in ("fact", "arithmetic", "known"):
            drop = before[f"split {kind}"]["logp"]["acc"] - after[f"split {kind}"]["logp"]["acc"]
            goals[f"{name}: held-out {kind}-pair accuracy falls by at most its stderr"] = (
                drop <= before[f"split {kind}"]["logp"]["stderr"]
            )
        goals[f"{name}: held-out split accuracy rises"] = (
            after["split"]["logp"]["acc"] > before["split"]["logp"]["acc"]
        )
        goals[f"{name}: held-out facts accuracy rises"] = (
            after["facts"]["logp"]["acc"] > before["facts"]["logp"]["acc"]
        )
        goals[f"{name}: real names still answered, not denied (falls by at most its stderr)"] = (
            before["real names"]["logp"]["acc"] - after["real names"]["logp"]["acc"]
            <= before["real names"]["logp"]["stderr"]
        )
        for task in CLOSED_BOOK:
            drop = before["closed book"][task]["acc"] - after["closed book"][task]["acc"]
            goals[f"{name}: {task} drops by at most its stderr"] = (
                drop <= before["closed book"][task]["stderr"]
            )
    implicit = f["results"]["dpo"]["facts"]["implicit reward"]
    goals["dpo: implicit-reward accuracy on held-out facts above chance (2 stderr)"] = (
        implicit["acc"] > 0.5 + 2 * implicit["stderr"]
    )
    f["goals"] = goals
    (out / "preference_world.json").write_text(json.dumps(f, indent=2) + "\n")
    print("\n" + "\n".join(f"  {'met    ' if ok else 'NOT MET'}  {goal}" for goal, ok in goals.items()))
    for key, value in (("before", before), *((m, f["results"][m]) for m in f["methods"])):
        benchmark.extra_info[f"{key} held-out split acc"] = value["split"]["logp"]["acc"]
        benchmark.extra_info[f"{key} held-out facts acc"] = value["facts"]["logp"]["acc"]
    assert f["scorer max |diff| vs transformers"] < 1e-3
    # Asserted for both methods: issue 16's must-show (held-out pairs rise, closed-book accuracy holds),
    # and that the model did not learn to deny everything (real names, the held-out known pairs).
    asserted = [
        f"{name}: {goal}"
        for name in f["methods"]
        for goal in (
            "held-out unknown-pair accuracy rises by more than 2 stderr",
            "held-out fact-pair accuracy falls by at most its stderr",
            "held-out known-pair accuracy falls by at most its stderr",
            "real names still answered, not denied (falls by at most its stderr)",
            *(f"{task} drops by at most its stderr" for task in CLOSED_BOOK),
        )
    ]
    for goal in asserted:
        assert goals[goal], goal
