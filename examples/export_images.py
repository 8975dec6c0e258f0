"""Save the images a run logged to TensorBoard as PNG files (the README's pictures).

    python examples/export_images.py runs/demo/version_0 docs/images [--step last|first|all]

Reads the event files with TensorBoard's own reader; one PNG per tag (``/`` becomes
``__``), or one per step with ``--step all``.
"""

from __future__ import annotations

import argparse
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def export(run_dir: str, out_dir: str, step: str = "last", prefix: str = "") -> list[str]:
    acc = EventAccumulator(run_dir, size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()["images"]
    if not tags:
        raise SystemExit(f"no images in {run_dir} (expected a folder with events.out.tfevents.* files)")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for tag in tags:
        events = acc.Images(tag)
        chosen = {"last": events[-1:], "first": events[:1], "all": events}[step]
        for event in chosen:
            suffix = f"_step{event.step}" if step == "all" else ""
            path = os.path.join(out_dir, prefix + tag.replace("/", "__").replace("#", "-") + suffix + ".png")
            with open(path, "wb") as f:
                f.write(event.encoded_image_string)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run folder holding events.out.tfevents.* files")
    parser.add_argument("out_dir", help="where to write the PNG files")
    parser.add_argument("--step", choices=("last", "first", "all"), default="last")
    parser.add_argument("--prefix", default="", help="prefix for the file names")
    args = parser.parse_args(argv)
    for path in export(args.run_dir, args.out_dir, args.step, args.prefix):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
