"""lmstack quickstart: the whole chain on the bundled defaults, as far as it has landed.

Today that is lmstack-core and lmstack-infer:
  1. train a byte-level BPE tokenizer on text shipped in this repository (its docs);
  2. create a tiny InternLM-style model (random weights: training arrives with lmstack-train)
     and save it with the tokenizer as a Hugging Face directory;
  3. load that directory back as a user would load any checkpoint: config, parameter count;
  4. chat-format and tokenize a conversation with the model's own template, and run a forward pass;
  5. generate with lmstack-infer's engine: greedy completions, a chat reply, seeded samples.

The default model's weights are random until lmstack-train lands, so the text it generates is
noise: the quickstart shows the machinery, not a model.

Run it with `nox -s quickstart`, or `python examples/quickstart.py [--model PATH]` to point steps 3-5
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
from lmstack.infer import LLM, RequestOutput, SamplingParams

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
    del model  # step 5 loads its own copy

    generate_with_infer(path, conversation, random_weights=args.model is None)
    print("\nquickstart finished")


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


def generate_with_infer(path: Path, conversation: list[dict[str, str]], *, random_weights: bool) -> None:
    step("5. generate with lmstack-infer")
    if random_weights:
        print("The default model's weights are random until lmstack-train lands: expect noise, not text.")
    llm = LLM(path, dtype=torch.float32)
    engine = llm.engine
    print(
        f"engine: KV cache of {engine.num_blocks} blocks x {engine.config.block_size} tokens, "
        f"context {llm.max_model_len}"
    )
    start = time.perf_counter()
    greedy = SamplingParams(temperature=0, max_tokens=16)
    print("greedy:")
    tokens = show(llm.generate(["lmstack is", "The KV cache holds", "def main():"], greedy, use_tqdm=False))
    print("chat:")
    tokens += show(llm.chat(conversation, greedy, use_tqdm=False), [f"user: {conversation[-1]['content']!r}"])
    print("sampled (temperature 0.8, top_p 0.95, seed 0, n=2):")
    sampled = SamplingParams(n=2, temperature=0.8, top_p=0.95, seed=0, max_tokens=16)
    tokens += show(llm.generate(["Once upon a time"], sampled, use_tqdm=False))
    seconds = time.perf_counter() - start
    print(f"generated {tokens} tokens in {seconds:.2f} s ({tokens / seconds:.0f} tokens/s)")
    llm.close()


if __name__ == "__main__":
    main()
