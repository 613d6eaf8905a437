"""Write the bundled world's files into a folder.

Usage:
`python examples/world/generate.py --out out/world [--seed 0] [--preset NAME] [--entities N] [--force]`.

The folder gets articles.jsonl, pretrain.jsonl, chats.jsonl, context_chats.jsonl, preferences.jsonl,
heldout.jsonl and manifest.json (see README.md next to this file). When the manifest already there
records the same format version, seed and parameters, and every file still has its recorded
SHA-256, nothing is written unless `--force` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# `world` sits next to this file: make it importable however this file is run or loaded.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import world


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = world.WorldParams()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path("out/world"), help="output folder (default: out/world)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--preset",
        choices=sorted(world.PRESETS),
        default="default",
        help="a named parameter set: default, or quickstart (the default model's small world)",
    )
    parser.add_argument(
        "--entities",
        type=int,
        default=None,
        help=f"number of entities, 40 to 3000 (default: the preset's; {defaults.num_entities} for default)",
    )
    parser.add_argument("--force", action="store_true", help="regenerate even when the manifest matches")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    params = world.PRESETS[args.preset]
    if args.entities is not None:
        params = dataclasses.replace(params, num_entities=args.entities)
    args.entities = params.num_entities
    if not args.force and world.is_current(args.out, args.seed, params):
        print(
            f"{args.out}: up to date (seed {args.seed}, {args.entities} entities), nothing written; "
            "--force to write it again"
        )
        return 0
    start = time.perf_counter()
    try:
        paths = world.generate(args.out, seed=args.seed, force=True, **dataclasses.asdict(params))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    manifest = world.read_manifest(args.out) or {}
    files = manifest.get("files", {})
    print(f"{args.out}: world of {args.entities} entities, seed {args.seed}, written in {seconds:.2f} s")
    total = 0
    for name in world.FILES:
        info = files[name]
        total += info["bytes"]
        print(f"  {name:<22} {info['rows']:>6} rows {info['bytes'] / 1e6:>8.3f} MB")
    print(f"  {'total':<22} {'':>11} {total / 1e6:>8.3f} MB  (+ {paths[world.MANIFEST].name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
