"""The workload of the SFT benchmarks: a random llama, one skewed mix of chats, the steps and batch sizes.

Both trainers start from the same checkpoint directory (written by lmstack-core, loaded by lmstack and
by ``transformers``) and train on the same conversations with the loss on the assistant turns only.
The chats come from the bundled world: short fact chats (about 30-150 tokens) mixed 3:1 with the
longer answer-from-context chats (about 130-250 tokens), so lengths are skewed and bimodal, which is
where padding costs.

lmstack packs bins of ``max_length`` tokens, ``lmstack_bins`` per step; the Hugging Face side takes
``hf_batch_size`` samples per step, chosen so that its real (non-padding) tokens per step match
lmstack's on average. A :class:`Plan` (``PLANS``) names the model size and these numbers: ``small`` (the
CPU benchmark's 11.7M llama), ``smollm`` (SmolLM-135M's shape on the CPU), ``tinyllama`` (TinyLlama-1.1B's
shape, for the GPU benchmark) and ``smoke`` (the small model for a few steps: proves a code path runs).
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Plan:
    """A model size and how long and how wide each side trains it.

    Attributes:
        name: The plan's key in :data:`PLANS`.
        model: The model shape (a key of ``_bench_model.SHAPES``).
        warmup_steps: Steps run before timing starts (first-touch allocations, lazy initialisation,
            compilation).
        measured_steps: Timed optimizer steps per side.
        max_length: lmstack's bin length (every sample fits whole: the longest is about 250 tokens), and
            TRL's packed sequence length.
        lmstack_bins: Packed bins per lmstack step (and TRL packed sequences per step).
    """

    name: str
    model: str
    warmup_steps: int
    measured_steps: int
    max_length: int
    lmstack_bins: int

    @property
    def total_steps(self) -> int:
        """Warm-up and measured steps."""
        return self.warmup_steps + self.measured_steps


PLANS = {
    "small": Plan("small", "small", warmup_steps=2, measured_steps=12, max_length=512, lmstack_bins=2),
    # ~0.8 GFLOP a token to train (6 x 135M): about 100 tokens/s on one CPU thread, so one 512-token bin a
    # step (about 5 s) and 6 measured steps keep each side near a minute.
    "smollm": Plan("smollm", "smollm", warmup_steps=1, measured_steps=6, max_length=512, lmstack_bins=1),
    # One H200, bf16 autocast: 2 bins of 2,048 a step; 12 steps (48.7k tokens) stay within one epoch of the
    # chats (52.5k tokens).
    "tinyllama": Plan(
        "tinyllama", "tinyllama", warmup_steps=3, measured_steps=9, max_length=2048, lmstack_bins=2
    ),
    "smoke": Plan("smoke", "small", warmup_steps=1, measured_steps=2, max_length=512, lmstack_bins=2),
}
"""The plans by name."""

WARMUP_STEPS = PLANS["small"].warmup_steps
MEASURED_STEPS = PLANS["small"].measured_steps
MAX_LENGTH = PLANS["small"].max_length
LMSTACK_BINS = PLANS["small"].lmstack_bins
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
    plan: str
    vocab_size: int
    tokenizer_vocab_size: int

    @staticmethod
    def load(directory: Path) -> Workload:
        """The workload built in ``directory``."""
        return Workload(**json.loads((directory / "workload.json").read_text()))

    @property
    def steps(self) -> Plan:
        """The plan it was built for."""
        return PLANS[self.plan]


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


def build(directory: Path, plan: str = "small") -> Workload:
    """Write the model, the chats (OpenAI messages jsonl) and their tokenization; return the sizes.

    Args:
        directory: Where to write them (``workload.json`` describes them).
        plan: A key of :data:`PLANS`: the model's size, the steps and the batch sizes.
    """
    from _bench_model import bench_llama

    from lmstack.core import save_pretrained
    from lmstack.train.data import Sample, SampleTokenizer

    if plan not in PLANS:
        raise ValueError(f"unknown plan {plan!r}; choose one of {', '.join(PLANS)}")
    p = PLANS[plan]
    directory.mkdir(parents=True, exist_ok=True)
    rows, corpus = _world()
    model, tokenizer = bench_llama(corpus, SEED, size=p.model)
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
    lmstack_tokens = p.lmstack_bins * p.max_length * 0.99
    workload = Workload(
        model=str(model_dir), chats=str(chats), tokenized=str(tokenized), num_samples=len(samples),
        mean_length=float(lengths.mean()), loss_tokens=loss_tokens,
        lengths_percentiles=[float(x) for x in np.percentile(lengths, [0, 10, 50, 90, 100])],
        hf_batch_size=max(1, round(lmstack_tokens / float(lengths.mean()))),
        lmstack_tokens_per_step=lmstack_tokens, params=model.num_parameters(), plan=plan,
        vocab_size=model.config.vocab_size, tokenizer_vocab_size=tokenizer.vocab_size,
    )  # fmt: skip
    (directory / "workload.json").write_text(json.dumps(asdict(workload), indent=1))
    return workload
