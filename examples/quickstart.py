"""lmstack quickstart: the whole chain on the bundled defaults, as far as it has landed.

Today that is lmstack-core alone:
  1. train a byte-level BPE tokenizer on text shipped in this repository (its docs);
  2. create a tiny InternLM-style model (random weights: training arrives with lmstack-train)
     and save it with the tokenizer as a Hugging Face directory;
  3. load that directory back as a user would load any checkpoint: config, parameter count;
  4. chat-format and tokenize a conversation with the model's own template, and run a forward pass.

Run it with `nox -s quickstart`, or `python examples/quickstart.py [--model PATH]` to point steps 3-4
at an existing Hugging Face directory (llama, mistral, qwen2, internlm2, internlm3) instead.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from lmstack.core import CausalLM, ModelConfig, load_config, load_pretrained, save_pretrained
from lmstack.core.tokenizer import Tokenizer, train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]


def step(title: str) -> None:
    print(f"\n== {title}")


def build_default_model(out: Path) -> Path:
    corpus = sorted(REPO.glob("*.md")) + sorted(REPO.glob("packages/*/README.md"))
    step(f"1. train a byte-level BPE tokenizer on {len(corpus)} bundled text files")
    tokenizer = train_bpe_tokenizer([str(p) for p in corpus], vocab_size=1024, min_frequency=2)
    print(f"vocab size {tokenizer.vocab_size}, special tokens {tokenizer.all_special_ids}")

    step("2. create a tiny InternLM-style model and save it as a Hugging Face directory")
    torch.manual_seed(0)
    config = ModelConfig(
        model_type="llama",
        vocab_size=tokenizer.vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=1_000_000.0,
        rope_scaling=None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    save_pretrained(CausalLM(config), out, tokenizer=tokenizer)
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="an existing Hugging Face model directory to load instead")
    parser.add_argument(
        "--out", type=Path, default=REPO / "out" / "quickstart", help="where to write the default model"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    path = args.model or build_default_model(args.out / "tiny-model")

    step(f"3. load {path}")
    config = load_config(path)
    start = time.perf_counter()
    model = load_pretrained(path, dtype=torch.float32)
    tokenizer = Tokenizer.from_pretrained(path)
    rope = config.rope_scaling.rope_type if config.rope_scaling else "plain"
    print(
        f"{config.model_type}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_attention_heads} heads / {config.num_key_value_heads} kv heads, "
        f"rope {rope}, theta {config.rope_theta:g}"
    )
    print(f"{model.num_parameters():,} parameters, loaded in {time.perf_counter() - start:.2f} s")

    step("4. chat-format, tokenize, and run a forward pass")
    conversation = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is lmstack?"},
    ]
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
    assert isinstance(text, str)
    ids = tokenizer.encode(text, add_special_tokens=False)
    print("prompt:\n" + text)
    print(f"{len(ids)} tokens: {ids[:16]}{' ...' if len(ids) > 16 else ''}")
    assert tokenizer.decode(ids) == text, "decode(encode(text)) must give the text back"
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
    top = torch.topk(logits[0, -1].softmax(-1), k=5)
    guesses = ", ".join(
        f"{tokenizer.decode([int(i)])!r} {p:.3f}" for p, i in zip(top.values, top.indices, strict=True)
    )
    print(f"logits {tuple(logits.shape)}; next-token top 5: {guesses}")
    if args.model is None:
        print("(random weights: the default model is trained once lmstack-train lands)")
    print("\nquickstart finished")


if __name__ == "__main__":
    main()
