"""The workload of the SFT benchmark: one small random llama, one skewed mix of chats, the batch sizes.

Both trainers start from the same checkpoint directory (written by lmstack-core, loaded by lmstack and
by ``transformers``) and train on the same conversations with the loss on the assistant turns only.
The chats come from the bundled world: short fact chats (about 30-150 tokens) mixed 3:1 with the
longer answer-from-context chats (about 130-250 tokens), so lengths are skewed and bimodal, which is
where padding costs.

lmstack packs bins of ``MAX_LENGTH`` tokens, ``LMSTACK_BINS`` per step; the Hugging Face side takes
``hf_batch_size`` samples per step, chosen so that its real (non-padding) tokens per step match
lmstack's on average.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

WARMUP_STEPS = 2
"""Steps run before timing starts (first-touch allocations, lazy initialisation)."""
MEASURED_STEPS = 12
"""Timed optimizer steps per side."""
MAX_LENGTH = 512
"""lmstack's bin length (every sample fits whole: the longest is about 250 tokens)."""
LMSTACK_BINS = 2
"""Packed bins per lmstack step: 1024 token slots."""
NUM_CHATS = 480
NUM_CONTEXT_CHATS = 160
LEARNING_RATE = 3e-4
BETAS = (0.9, 0.95)
SEED = 0

TRAINING_CHAT_TEMPLATE = (
    "{% if bos_token is defined and bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] }}{{ '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""The model's ChatML template (lmstack-core's InternLM2 one, string contents) with the ``{% generation %}``
markers that TRL's ``assistant_only_loss`` needs around each reply and its ``<|im_end|>``: the same text,
and the same tokens under the loss as lmstack's ``train_on: assistant``."""


@dataclass(frozen=True)
class Workload:
    """Paths and sizes of a built workload (``workload.json`` in its directory)."""

    model: str
    chats: str
    tokenized: str
    num_samples: int
    mean_length: float
    loss_tokens: int
    lengths_percentiles: list[float]
    hf_batch_size: int
    lmstack_tokens_per_step: float
    params: int

    @staticmethod
    def load(directory: Path) -> Workload:
        return Workload(**json.loads((directory / "workload.json").read_text()))


def _world() -> tuple[list[dict[str, object]], list[str]]:
    """The seeded chat mix (OpenAI messages) and the pretraining texts that the tokenizer learns from."""
    sys.path.insert(0, str(ROOT / "examples" / "world"))
    import world

    files = world.build_files(seed=0)
    rng = random.Random(SEED)
    rows = rng.sample(files["chats.jsonl"], NUM_CHATS)
    rows += rng.sample(files["context_chats.jsonl"], NUM_CONTEXT_CHATS)
    rng.shuffle(rows)
    return [{"messages": r["messages"]} for r in rows], [r["text"] for r in files["pretrain.jsonl"]]


def build(directory: Path) -> Workload:
    """Write the model, the chats (OpenAI messages jsonl) and their tokenization; return the sizes."""
    from _bench_model import bench_llama

    from lmstack.core import save_pretrained
    from lmstack.train.data import Sample, SampleTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    rows, corpus = _world()
    model, tokenizer = bench_llama(corpus, SEED)
    model_dir = save_pretrained(model, directory / "model", tokenizer=tokenizer)
    chats = directory / "chats.jsonl"
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # The exact ids and labels lmstack trains on, for the plain Trainer (which has no chat-template masking).
    samples = SampleTokenizer(tokenizer, train_on="assistant")(
        [Sample(messages=r["messages"]) for r in rows]  # type: ignore[arg-type]
    )
    tokenized = directory / "tokenized.jsonl"
    with tokenized.open("w") as f:
        for s in samples:
            f.write(json.dumps({"input_ids": s.input_ids.tolist(), "labels": s.labels.tolist()}) + "\n")
    lengths = np.array([len(s) for s in samples])
    loss_tokens = int(sum(int(s.loss_mask.sum()) for s in samples))
    # Best-fit packing leaves well under 1% of the bins empty: lmstack's real tokens per step.
    lmstack_tokens = LMSTACK_BINS * MAX_LENGTH * 0.99
    workload = Workload(
        model=str(model_dir), chats=str(chats), tokenized=str(tokenized), num_samples=len(samples),
        mean_length=float(lengths.mean()), loss_tokens=loss_tokens,
        lengths_percentiles=[float(x) for x in np.percentile(lengths, [0, 10, 50, 90, 100])],
        hf_batch_size=max(1, round(lmstack_tokens / float(lengths.mean()))),
        lmstack_tokens_per_step=lmstack_tokens, params=sum(p.numel() for p in model.parameters()),
    )  # fmt: skip
    (directory / "workload.json").write_text(json.dumps(asdict(workload), indent=1))
    return workload
