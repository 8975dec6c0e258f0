"""``python -m lightning_vis.demo [--logdir DIR] [--epochs N]``."""

import sys

from lightning_vis.cli import main

sys.exit(main(["demo", *sys.argv[1:]]))
