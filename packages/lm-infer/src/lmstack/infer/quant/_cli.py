"""``lmstack quantize rtn|awq PATH OUT``: write a weight-only quantized checkpoint."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["register_quantize"]

logger = logging.getLogger(__name__)


def _run_quantize(args: argparse.Namespace) -> int:
    from lmstack.core import Tokenizer, load_pretrained
    from lmstack.infer.quant import quantize_model, save_quantized

    if args.method == "awq" and args.bits != 4:
        print(
            "error: AWQ quantizes to 4 bits; use --bits 4 (or `lmstack quantize rtn --bits 8`)",
            file=sys.stderr,
        )
        return 2
    model = load_pretrained(args.path, dtype=args.dtype)
    tokenizer = Tokenizer.from_pretrained(args.path)
    options = {}
    if args.method == "awq":
        options = {
            "tokenizer": tokenizer,
            "texts": args.calib,
            "n_samples": args.n_samples,
            "seq_len": args.seq_len,
        }
    quantize_model(
        model,
        args.method,
        args.bits,
        args.group_size,
        lm_head=args.lm_head,
        progress=args.progress,
        **options,
    )
    out = save_quantized(model, args.out, tokenizer, progress=args.progress)
    fmt = "AWQ GEMM" if args.bits == 4 else "GPTQ 8-bit"
    print(f"wrote {out} ({args.method}, {args.bits}-bit, {fmt} layout)")
    return 0


def register_quantize(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lmstack quantize rtn|awq PATH OUT [--bits 8|4] [--group-size 128]``."""
    p = subparsers.add_parser(
        "quantize", help="quantize a model's weights (int8/int4, round-to-nearest or AWQ)",
        description="Quantize the linear weights of a Hugging Face model directory and write a quantized "
        "checkpoint (4-bit: AutoAWQ GEMM layout; 8-bit: GPTQ per-channel layout) that `lmstack generate`, "
        "`lmstack serve` and LLM(path) load.",
    )  # fmt: skip
    methods = p.add_subparsers(title="methods", dest="method", metavar="METHOD", required=True)
    for name, help_text in (
        ("rtn", "round to nearest (int8 per-channel or int4 group-wise)"),
        ("awq", "activation-aware weight quantization, calibrated on local text (4-bit)"),
    ):
        m = methods.add_parser(name, help=help_text, description=help_text)
        m.add_argument("path", help="model directory (config.json, safetensors, tokenizer)")
        m.add_argument("out", help="output directory for the quantized checkpoint")
        m.add_argument("--bits", type=int, choices=(4, 8), default=4 if name == "awq" else 8)
        m.add_argument("--group-size", type=int, default=128, help="input columns per group for 4 bits")
        m.add_argument("--lm-head", action="store_true", help="quantize the (untied) output head too")
        m.add_argument(
            "--dtype", default=None, help="dtype to load the float model in (default: the checkpoint's)"
        )
        m.add_argument(
            "--progress", action=argparse.BooleanOptionalAction, default=None,
            help="progress bar over layers (default: on an interactive terminal)",
        )  # fmt: skip
        if name == "awq":
            m.add_argument(
                "--calib",
                default=None,
                help="calibration text: .jsonl or text file (default: the bundled world)",
            )
            m.add_argument("--n-samples", type=int, default=64, help="calibration sequences")
            m.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
        m.set_defaults(func=_run_quantize)
