"""The drift metrics' input figures (`PreparedImage.with_grey_stats`): the mean and standard
deviation of the model input in 8-bit grey levels, whatever the model's input scaling."""

from __future__ import annotations

import numpy as np
import pytest

from app.model.classifier import PreparedImage


@pytest.mark.parametrize(("scale", "offset"), [(1 / 127.5, -1.0), (1 / 255, 0.0), (1.0, 0.0)])
def test_grey_stats_are_those_of_the_grey_levels_the_tensor_was_made_from(scale, offset) -> None:
    rng = np.random.default_rng(7)
    grey = rng.integers(0, 256, size=(1, 224, 224, 1)).astype(np.uint8)
    grey[0, :40] = 0  # a dark border, as on many X-rays
    tensor = (grey.astype(np.float32) * np.float32(scale) + np.float32(offset)).astype(np.float32)
    mean, std = PreparedImage(tensor).with_grey_stats(scale, offset).grey_mean_std or (0.0, 0.0)
    assert mean == pytest.approx(float(grey.mean()), abs=1e-3)
    assert std == pytest.approx(float(grey.std()), abs=1e-3)
