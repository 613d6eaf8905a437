"""torchrun driver: train the same tiny model under several ``parallel:`` layouts in one process group.

argv: data.jsonl, tokenizer dir, output root, JSON list of cases. A case is ``{"name", "parallel",
"batch_size"}`` and optionally ``"precision"``, ``"compile"`` and ``"resume_from"`` (another case's
name: its run directory is copied up to its step-2 checkpoint and continued under this case's layout).
"""

import json
import random
import shutil
import sys
from pathlib import Path

import torch

from lmstack.core import CausalLM, ModelConfig, Tokenizer
from lmstack.train import DataConfig
from lmstack.train._dist import barrier, init_distributed
from lmstack.train._loop import OptimConfig, RunConfig, train_loop
from lmstack.train._parallel_config import ParallelConfig

MODEL = dict(
    model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
)  # fmt: skip


WORDS = ["the", "a", "model", "token", "layer", "attention", "shard", "rank", "pipeline", "stage"]


def write_docs(path):
    """200 documents of 3-50 words (the same ones for every layout and the reference)."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(200):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 50)))
            f.write(json.dumps({"id": i, "text": words.capitalize() + "."}) + "\n")


def run_case(tokenizer, data, out, parallel, batch_size, precision="float32", seen=None, compile=False):
    """Train 4 steps; ``seen`` (a dict) receives the dtype of a projection's weight as its forward sees it."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, **MODEL)
    model = CausalLM(cfg)
    if seen is not None:

        def record(module, args):  # returns None: the forward's inputs stay as they are
            seen.setdefault("forward_weight", str(module.weight.dtype))

        model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(record)
    return train_loop(
        model,
        tokenizer,
        DataConfig(paths=[str(data)], format="text", train_on="all", max_length=64),
        OptimConfig(lr=3e-3, warmup_steps=1),
        RunConfig(output_dir=str(out), max_steps=4, batch_size=batch_size, grad_accum=2, save_every=2,
                  keep_last=3, device="cpu", tensorboard=False, measure_activations=False,
                  precision=precision, compile=compile),
        parallel=ParallelConfig(**parallel) if parallel is not None else None,
    )  # fmt: skip


if __name__ == "__main__":
    data, tok_dir, root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    cases = json.loads(sys.argv[4])
    tokenizer = Tokenizer.from_pretrained(tok_dir)
    info = init_distributed("cpu")
    for case in cases:
        out = root / case["name"]
        if case.get("resume_from") and info.is_main:
            source = root / case["resume_from"]
            shutil.copytree(source, out, ignore=shutil.ignore_patterns("final", "step-00000004"))
        barrier()
        seen = {}
        result = run_case(tokenizer, data, out, case["parallel"], case["batch_size"],
                          case.get("precision", "float32"), seen, case.get("compile", False))  # fmt: skip
        if info.is_main:
            (out / "result.json").write_text(
                json.dumps({"start_step": result.start_step, "world": result.world_size,
                            "mode": result.data_parallel, "summary": result.summary(), **seen})
            )  # fmt: skip
        barrier()
