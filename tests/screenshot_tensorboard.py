"""Look at our pictures the way a user does: TensorBoard's Images tab in a real (headless) browser.

Trains a tiny demo run with the four core callbacks into a log directory, starts a real
``tensorboard`` process on 127.0.0.1, opens ``#images`` in headless Chromium and saves a
screenshot. Run it from the repository root::

    python tests/screenshot_tensorboard.py --out /tmp/images_tab.png
    python tests/screenshot_tensorboard.py --out docs/images/tensorboard_images_tab.png --height 1500 \\
        --pictures docs/images/legible__ \\
        --tag-filter "dead|deconv/net.features.4|evolution/net.features.8|filters"

``--pictures PREFIX`` also writes the last image of each tag (those matching ``--tag-filter``),
as logged, to ``PREFIX<tag with / replaced by __>.png``. Chromium: ``apt-get install -y chromium``.
Importing this module has no side effects (pytest's ``--doctest-modules`` imports it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
#: Every image tag prefix the tiny run must show before the screenshot is taken.
PREFIXES = ("filters/", "deconv/", "dead/activity", "evolution/")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_tiny_run(logdir: str | os.PathLike, *, epochs: int = 6, train_size: int = 256) -> None:
    """The demo CNN on generated shapes, a few epochs, with the four core callbacks."""
    from lightning_vis import callbacks as vis
    from lightning_vis.demo import run_demo

    callbacks = [
        vis.FilterGrid(every_n_steps=8),
        vis.DeconvProjection(),
        vis.DeadNeuronMonitor(every_n_steps=1, window=4),
        vis.FeatureEvolution(),
    ]
    run_demo(
        str(logdir), epochs=epochs, train_size=train_size, batch_size=32, callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip


def _get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.read()


def start_tensorboard(logdir: str | os.PathLike, port: int) -> subprocess.Popen:
    """A real ``tensorboard`` process serving ``logdir`` on 127.0.0.1:``port``."""
    exe = shutil.which("tensorboard")
    cmd = [exe] if exe else [sys.executable, "-m", "tensorboard.main"]
    return subprocess.Popen(
        [*cmd, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip


def wait_for_images(proc: subprocess.Popen, port: int, timeout: float = 120) -> dict[str, list[str]]:
    """Block until the server lists an image tag for every prefix in :data:`PREFIXES`."""
    deadline = time.monotonic() + timeout
    tags: dict[str, list[str]] = {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tensorboard exited with code {proc.returncode}")
        try:
            tags = json.loads(_get(port, "/data/plugin/images/tags"))
        except OSError:
            tags = {}
        found = [t for run_tags in tags.values() for t in run_tags]
        if tags and all(any(t.startswith(p) for t in found) for p in PREFIXES):
            return tags
        time.sleep(0.5)
    raise TimeoutError(f"tensorboard did not list images for {PREFIXES} within {timeout} s; got {tags}")


def image_sizes(port: int) -> dict[str, tuple[int, int]]:
    """``tag -> (width, height)`` of the newest image of every image tag, as the browser gets it."""
    import urllib.parse

    from PIL import Image

    sizes = {}
    for run, run_tags in json.loads(_get(port, "/data/plugin/images/tags")).items():
        for tag in run_tags:
            query = urllib.parse.urlencode({"run": run, "tag": tag})
            last = json.loads(_get(port, f"/data/plugin/images/images?{query}"))[-1]
            png = _get(port, f"/data/plugin/images/individualImage?{last['query']}")
            sizes[tag] = Image.open(io.BytesIO(png)).size
    return sizes


def screenshot(url: str, out: str | os.PathLike, *, chromium: str = CHROMIUM, width: int = 1400,
               height: int = 1000, budget_ms: int = 20000) -> Path:  # fmt: skip
    """Headless Chromium screenshot of ``url`` (a fresh, empty profile; no network besides ``url``)."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}",
            f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url,
        ]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)
    if not out.exists():
        raise RuntimeError(f"chromium wrote no screenshot to {out}")
    return out


def save_pictures(logdir: str | os.PathLike, prefix: str, pattern: str | None = None) -> list[Path]:
    """The last logged image of every tag (matching the regular expression ``pattern``), as PNG files
    ``<prefix><tag, '/' -> '__'>.png``."""
    import re

    from PIL import Image
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer(size_guidance={"images": 0})
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    written = []
    for run, content in mux.Runs().items():
        for tag in content.get("images", []):
            if pattern and not re.search(pattern, tag):
                continue
            last = mux.Images(run, tag)[-1]
            path = Path(f"{prefix}{tag.replace('/', '__')}.png")
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.open(io.BytesIO(last.encoded_image_string)).save(path)
            written.append(path)
    return written


def capture(out: str | os.PathLike, *, logdir: str | os.PathLike | None = None, epochs: int = 6,
            train_size: int = 256, pictures: str | None = None, tag_filter: str | None = None,
            chromium: str = CHROMIUM, **shot: Any) -> tuple[Path, dict[str, tuple[int, int]]]:  # fmt: skip
    """Train (unless ``logdir`` already holds a run), serve, screenshot.

    Returns the PNG's path and the served images' sizes (``tag -> (width, height)``).
    ``tag_filter``: a regular expression typed into the Images tab's tag filter (through
    the URL), e.g. to show categories that the tab opens collapsed.
    """
    import urllib.parse

    with tempfile.TemporaryDirectory(prefix="lv-screenshot-") as tmp:
        if logdir is None:
            logdir = Path(tmp) / "runs"
            train_tiny_run(logdir, epochs=epochs, train_size=train_size)
        if pictures:
            save_pictures(logdir, pictures, tag_filter)
        port = free_port()
        proc = start_tensorboard(logdir, port)
        try:
            wait_for_images(proc, port)
            sizes = image_sizes(port)
            url = f"http://127.0.0.1:{port}/#images"
            if tag_filter:
                url += "&tagFilter=" + urllib.parse.quote(tag_filter, safe="")
            return screenshot(url, out, chromium=chromium, **shot), sizes
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tensorboard_images_tab.png", help="screenshot PNG path")
    parser.add_argument("--logdir", help="serve this log directory instead of training a tiny run")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of the tiny run")
    parser.add_argument("--pictures", help="also save each tag's last image as <PREFIX><tag>.png")
    parser.add_argument("--tag-filter", help="regular expression for the Images tab's tag filter")
    parser.add_argument("--chromium", default=CHROMIUM)
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000)
    args = parser.parse_args(argv)
    path, sizes = capture(args.out, logdir=args.logdir, epochs=args.epochs, pictures=args.pictures,
                          tag_filter=args.tag_filter, chromium=args.chromium, width=args.width,
                          height=args.height)  # fmt: skip
    for tag, (w, h) in sorted(sizes.items()):
        print(f"{tag}: {w} x {h} px")
    print(path)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
