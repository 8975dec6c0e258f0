"""``lightning-vis`` command line: ``lightning-vis demo --logdir DIR [--epochs N]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-vis", description="See inside a CNN while it trains.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train the built-in CNN on generated shapes with every callback, log to TensorBoard",
        description="Train a small CNN on a generated dataset of coloured shapes and oriented textures "
        "with every lightning_vis callback, logging to TensorBoard.",
    )
    demo.add_argument("--logdir", default="runs", help="TensorBoard log directory (default: runs)")
    demo.add_argument("--epochs", type=int, default=12, help="training epochs (default: 12)")
    demo.add_argument("--train-size", type=int, default=16384, help="generated training images (default: 16384)")
    demo.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--no-callbacks", action="store_true", help="train without the lightning_vis callbacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from lightning_vis.demo import run_demo

        for flag, value, least in (("--epochs", args.epochs, 1), ("--train-size", args.train_size, 64),
                                   ("--batch-size", args.batch_size, 1)):  # fmt: skip
            if value < least:
                print(f"lightning-vis: {flag} must be >= {least}, got {value}", file=sys.stderr)
                return 2
        if args.batch_size > args.train_size:
            print(f"lightning-vis: --batch-size ({args.batch_size}) must not exceed --train-size "
                  f"({args.train_size})", file=sys.stderr)  # fmt: skip
            return 2
        run_demo(
            logdir=args.logdir,
            epochs=args.epochs,
            train_size=args.train_size,
            batch_size=args.batch_size,
            seed=args.seed,
            callbacks=not args.no_callbacks,
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
