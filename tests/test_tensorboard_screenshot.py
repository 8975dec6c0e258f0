"""What a user sees: TensorBoard's Images tab in headless Chromium, on a tiny run with the four callbacks.

The real check is a person looking at the screenshot (``python tests/screenshot_tensorboard.py``);
this test makes sure the script works end to end, that the page is not blank, and that every
picture fits TensorBoard's 350-px image card (wider pictures are shrunk by dropping pixels).
"""

import os

import pytest
import torch

from lightning_vis.render import CARD_WIDTH_PX
from tests.screenshot_tensorboard import CHROMIUM, capture


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"needs Chromium at {CHROMIUM} (apt-get install chromium)")
def test_images_tab_screenshot_is_taken_and_every_picture_fits_the_card(tmp_path):
    from PIL import Image

    path, sizes = capture(tmp_path / "images_tab.png", epochs=2, train_size=128, width=1400, height=1000)
    kinds = {tag.split("/")[0] for tag in sizes}
    assert {"filters", "deconv", "dead", "evolution"} <= kinds, sorted(sizes)
    for tag, (width, height) in sizes.items():
        assert width <= CARD_WIDTH_PX, f"{tag} is {width} px wide: the card shrinks it by dropping pixels"
        assert height <= 1024, f"{tag} is {height} px tall: the card scrolls past 1024 px"
    shot = torch.from_numpy(__import__("numpy").asarray(Image.open(path).convert("RGB")))
    assert shot.shape == (1000, 1400, 3)
    pixels = shot.reshape(-1, 3)
    assert len(torch.unique(pixels, dim=0)) > 1000  # pictures, not an empty page
    cards = shot[150:, 330:]  # right of the settings pane, below the header: the image cards
    assert (cards.float().std(dim=(0, 1)) > 20).all()
