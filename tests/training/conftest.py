from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _synthetic_xray(rng: np.random.Generator, sick: bool, size: int = 160) -> Image.Image:
    """A grey 'chest' with dark lungs; PNEUMONIA images get bright blotches in a lung field."""
    base = np.full((size, size), 40, np.uint8)
    img = Image.fromarray(base)
    draw = ImageDraw.Draw(img)
    draw.ellipse((size * 0.15, size * 0.2, size * 0.45, size * 0.85), fill=15)
    draw.ellipse((size * 0.55, size * 0.2, size * 0.85, size * 0.85), fill=15)
    if sick:
        for _ in range(3):
            x, y = rng.integers(int(size * 0.2), int(size * 0.75), 2)
            r = int(rng.integers(8, 18))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=int(rng.integers(150, 220)))
    noise = rng.normal(0, 6, (size, size))
    return Image.fromarray(
        np.clip(np.asarray(img, float) + noise, 0, 255).astype(np.uint8)
    ).convert("RGB")


@pytest.fixture(scope="session")
def tiny_kaggle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and test/ with NORMAL and PNEUMONIA synthetic images; several images per patient."""
    root = tmp_path_factory.mktemp("tiny_xray")
    rng = np.random.default_rng(0)
    for split, n_patients in (("train", 16), ("test", 6)):
        for cls in ("NORMAL", "PNEUMONIA"):
            d = root / split / cls
            d.mkdir(parents=True)
            for p in range(n_patients):
                for i in range(2):
                    name = (
                        f"IM-{p:04d}-{i + 1:04d}.jpeg"
                        if cls == "NORMAL"
                        else f"person{p}_bacteria_{i}.jpeg"
                    )
                    _synthetic_xray(rng, cls == "PNEUMONIA").save(d / name, quality=92)
    return root
