"""The workload of the DPO benchmark: the SFT benchmark's random llama, one skewed mix of preference pairs.

Every side starts from the same checkpoint directory (the SFT benchmark's model: same seed, same
world-trained tokenizer with the ChatML template) and trains on the same pairs. The pairs come from the
bundled world: short fact pairs from ``preferences.jsonl`` (a question; the right statement against the
same statement with another entity's value, or an arithmetic result against one off by a little), mixed
3:1 with long answer-from-context pairs built from the answerable ``context_chats.jsonl`` (the context
prompt; the right answer sentence against the same sentence with another value of that attribute). So a
pair's two sequences are about 30-70 tokens each, or about 130-250, which is where padding costs.

lmstack packs whole pairs (chosen and rejected back to back) into bins of ``MAX_LENGTH`` tokens,
``LMSTACK_BINS`` per step; the padded sides (lmstack's ``pack=False`` and TRL) take ``pairs_per_step``
pairs per step, chosen so that their real (non-padding) tokens per step match lmstack's on average.
Tokens are counted the same way everywhere: every real token of both sequences of a pair (the prompt
counts twice, once per sequence, because both sides compute it twice).
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _sft_workload as sft_wl

ROOT = sft_wl.ROOT
WARMUP_STEPS = 2
"""Steps run before timing starts (first-touch allocations, lazy initialisation)."""
MEASURED_STEPS = 12
"""Timed optimizer steps per side."""
MAX_LENGTH = 1024
"""lmstack's bin length: every pair fits whole (the longest, both sequences together, is about 500)."""
LMSTACK_BINS = 1
"""Packed bins per lmstack step: 1024 token slots, as in the SFT benchmark."""
NUM_FACT_PAIRS = 420
NUM_CONTEXT_PAIRS = 140
LEARNING_RATE = 3e-5
"""Small, as usual for DPO (and so that the loss moves but does not collapse in 14 steps)."""
BETAS = sft_wl.BETAS
BETA = 0.1
"""DPO's beta (sigmoid loss)."""
SEED = sft_wl.SEED


@dataclass(frozen=True)
class Workload:
    """Paths and sizes of a built workload (``workload.json`` in its directory)."""

    model: str
    preferences: str
    num_pairs: int
    mean_pair_tokens: float
    pair_percentiles: list[float]
    sequence_percentiles: list[float]
    total_tokens: int
    completion_tokens: int
    pairs_per_step: int
    lmstack_tokens_per_step: float
    params: int

    @staticmethod
    def load(directory: Path) -> Workload:
        return Workload(**json.loads((directory / "workload.json").read_text()))


def _context_pairs(rows: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    """Preference pairs from answerable context chats: the answer against it with another value swapped in."""
    answerable = [
        r for r in rows if r["meta"]["answerable"] and r["meta"]["answer"] in r["messages"][-1]["content"]
    ]
    values: dict[str, set[str]] = {}
    for r in answerable:
        values.setdefault(r["meta"]["attribute"], set()).add(r["meta"]["answer"])
    pairs = []
    for r in rng.sample(answerable, NUM_CONTEXT_PAIRS):
        value = r["meta"]["answer"]
        answer = r["messages"][-1]["content"]
        wrong = rng.choice(sorted(values[r["meta"]["attribute"]] - {value}))
        pairs.append(
            {"prompt": r["messages"][:-1], "chosen": answer, "rejected": answer.replace(value, wrong)}
        )
    return pairs


def _world() -> tuple[list[dict[str, Any]], list[str]]:
    """The seeded pair mix (TRL's conversational prompt + text completions) and the pretraining texts."""
    sys.path.insert(0, str(ROOT / "examples" / "world"))
    import world

    files = world.build_files(seed=0)
    rng = random.Random(SEED)
    # The fact and arithmetic pairs only (the world's first rows, in their order), as this workload was
    # defined before the world added its unknown-name pairs: the same pairs are sampled.
    short = [r for r in files["preferences.jsonl"] if r["meta"]["kind"] in ("fact", "arithmetic")]
    facts = rng.sample(short, NUM_FACT_PAIRS)
    pairs = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in facts]
    pairs += _context_pairs(files["context_chats.jsonl"], rng)
    rng.shuffle(pairs)
    return pairs, [r["text"] for r in files["pretrain.jsonl"]]


def build(directory: Path) -> Workload:
    """Write the model and the pairs (``preferences.jsonl``); return the sizes (by lmstack's tokenization)."""
    from _bench_model import bench_llama

    from lmstack.core import save_pretrained
    from lmstack.train.data._preference import PreferenceSample, PreferenceTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    pairs, corpus = _world()
    model, tokenizer = bench_llama(corpus, SEED)  # the SFT benchmark's model: same corpus, same seed
    model_dir = save_pretrained(model, directory / "model", tokenizer=tokenizer)
    preferences = directory / "preferences.jsonl"
    preferences.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    samples = [
        PreferenceSample(
            prompt=p["prompt"],
            completions=[{"role": "assistant", "content": p[k]} for k in ("chosen", "rejected")],
        )
        for p in pairs
    ]
    tokenized = PreferenceTokenizer(tokenizer)(samples)
    sequences = np.array([n for t in tokenized for n in t.lengths])
    units = sequences.reshape(-1, 2).sum(axis=1)
    completion = sum(int(c.shape[0]) for t in tokenized for c in t.completion_ids)
    # Best-fit packing of such small units leaves ~1% of a bin empty: lmstack's real tokens per step.
    lmstack_tokens = LMSTACK_BINS * MAX_LENGTH * 0.99
    workload = Workload(
        model=str(model_dir), preferences=str(preferences), num_pairs=len(pairs),
        mean_pair_tokens=float(units.mean()),
        pair_percentiles=[float(x) for x in np.percentile(units, [0, 10, 50, 90, 100])],
        sequence_percentiles=[float(x) for x in np.percentile(sequences, [0, 10, 50, 90, 100])],
        total_tokens=int(units.sum()), completion_tokens=completion,
        pairs_per_step=max(1, round(lmstack_tokens / float(units.mean()))),
        lmstack_tokens_per_step=lmstack_tokens, params=sum(p.numel() for p in model.parameters()),
    )  # fmt: skip
    (directory / "workload.json").write_text(json.dumps(asdict(workload), indent=1))
    return workload
