"""The heat-map Secondary Capture drawn on the X-ray itself: the source's own pixels through the
model's display pipeline at the source's size and aspect ratio (or a 2048 px short side), the map
at its cells' true positions, every word in a band below the image, and dciodvfy clean."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from app.contract import ModelMetadata, load_metadata
from app.pacs.objects import (
    HEATMAP_MAX_SHORT_SIDE,
    build_heatmap_sc,
    encode,
    heatmap_headline,
    heatmap_overlay,
    heatmap_size,
    render_heatmap,
    render_objects,
)
from app.pacs.pipeline import heatmap_picture
from app.testing.dicom_files import CR_STORAGE, make_dataset, ramp
from tests.app.pacs.pacs_results import grey_u8, make_facts, rg1_path
from tests.app.pacs.pacs_servers import require_tool

REPO = Path(__file__).resolve().parents[3]
MAX_PIXELS, MIN_SIDE = 50_000_000, 64


@pytest.fixture(scope="module")
def metadata() -> ModelMetadata:
    return load_metadata(REPO / "models" / "pneumonia_cxr.json")


def _input_size(metadata: ModelMetadata) -> tuple[int, int]:
    return metadata.preprocessing.width, metadata.preprocessing.height


def _hot_cell(row: int, column: int, cells: int = 7) -> list[list[float]]:
    grid = [[0.0] * cells for _ in range(cells)]
    grid[row][column] = 1.0
    return grid


def _part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1955, 1841), (1955, 1841)),  # RG1: its own pixels
        ((600, 400), (600, 400)),  # smaller than 1024: the source's size, never enlarged
        ((4280, 3520), (2490, 2048)),
        ((3000, 5000), (2048, 3413)),
    ],
)
def test_the_image_area_is_the_source_size_or_a_2048_px_short_side(
    size: tuple[int, int], expected: tuple[int, int]
) -> None:
    width, height = heatmap_size(*size)
    assert (width, height) == expected
    assert min(width, height) >= min(1024, *size)
    assert min(width, height) <= HEATMAP_MAX_SHORT_SIDE
    # the aspect ratio within a pixel
    assert abs(width - height * size[0] / size[1]) <= 1.0


def test_rg1_heat_map_is_drawn_on_its_own_pixels_and_passes_dciodvfy(
    metadata: ModelMetadata, tmp_path: Path
) -> None:
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    data = rg1_path().read_bytes()
    source = pydicom.dcmread(io.BytesIO(data))
    rows, columns = int(source.Rows), int(source.Columns)
    assert rows != columns
    picture = heatmap_picture(data, metadata, MAX_PIXELS, MIN_SIDE)
    assert picture.shape == (rows, columns)
    facts = make_facts(cam_grid=_hot_cell(3, 2))
    sc = build_heatmap_sc(source, facts, picture, input_size=_input_size(metadata))
    path = tmp_path / "sc.dcm"
    path.write_bytes(encode(sc))
    read = pydicom.dcmread(path)
    assert (read.Columns, read.BurnedInAnnotation) == (columns, "YES")
    assert read.Rows > rows  # the band below the image
    pixels = read.pixel_array
    assert np.array_equal(
        pixels[:rows], heatmap_overlay(picture, facts, input_size=_input_size(metadata))
    )
    run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    assert "SCImage" in output
    assert [line for line in output.splitlines() if line.startswith("Error")] == []


def test_no_text_inside_the_image_area() -> None:
    image = grey_u8(300, 500)
    input_size = (224, 224)
    for facts in (make_facts(), make_facts(probability=0.2), make_facts(disclaimer="x " * 200)):
        drawn = render_heatmap(image, facts, input_size=input_size)
        # the image area is exactly the blend, without a single text or legend pixel
        assert np.array_equal(drawn[:300], heatmap_overlay(image, facts, input_size=input_size))
        assert drawn.shape[1] == 500 and drawn.shape[0] > 300
    # the words are burned into the band: another disclaimer changes it
    a = render_heatmap(image, make_facts(), input_size=input_size)
    b = render_heatmap(image, make_facts(disclaimer="Research use only."), input_size=input_size)
    assert not np.array_equal(a[300:], b[300:])
    # the legend's ramp is in the band: red at its right end, blue at its left
    band = a[300:].astype(int)
    assert (band[..., 0] - band[..., 2]).max() > 150
    assert (band[..., 2] - band[..., 0]).max() > 150


def test_the_headline_says_what_the_map_is_of_and_the_answer() -> None:
    normal = heatmap_headline(make_facts(probability=0.372))
    assert "AI: PNEUMONIA" not in normal
    assert "evidence for PNEUMONIA" in normal and "AI answer: NORMAL" in normal
    assert "0.372" in normal and "below the threshold 0.430" in normal
    positive = heatmap_headline(make_facts(probability=0.9))
    assert "AI answer: PNEUMONIA" in positive and "at or above the threshold" in positive


@pytest.mark.parametrize(("rows", "columns"), [(300, 640), (700, 350)])
def test_a_single_hot_cell_is_drawn_over_its_receptive_field(rows: int, columns: int) -> None:
    """The model input is the source squeezed to 224 x 224, so a cell's field scales per axis:
    cell (row 2, column 5) of 7 is centred at (5.5 / 7 of the width, 2.5 / 7 of the height)."""
    image = np.full((rows, columns), 128, dtype=np.uint8)
    facts = make_facts(cam_grid=_hot_cell(2, 5))
    drawn = render_heatmap(image, facts, input_size=(224, 224))[:rows].astype(int)
    red = (drawn[..., 0] > 150) & (drawn[..., 1] < 90) & (drawn[..., 2] < 90)
    ys, xs = np.nonzero(red)
    assert len(xs) > 0
    centre_x, centre_y = 5.5 / 7 * columns, 2.5 / 7 * rows
    assert abs(xs.mean() + 0.5 - centre_x) <= 1.5
    assert abs(ys.mean() + 0.5 - centre_y) <= 1.5
    # the red stays within the cell's own field
    assert xs.min() >= 5 / 7 * columns - 1 and xs.max() <= 6 / 7 * columns + 1
    assert ys.min() >= 2 / 7 * rows - 1 and ys.max() <= 3 / 7 * rows + 1


def test_the_picture_is_the_display_pipeline_rendering(metadata: ModelMetadata) -> None:
    """MONOCHROME1 is inverted as for the model input, the window applied, and the picture keeps
    the source's size and aspect ratio."""
    stored = ramp(300, 500, high=4095)
    window = (2048.0, 4096.0)
    plain = make_dataset(stored, sop_class=CR_STORAGE, modality="CR", window=window)
    inverted = make_dataset(
        stored, sop_class=CR_STORAGE, modality="CR", window=window, photometric="MONOCHROME1"
    )
    a = heatmap_picture(_part10(plain), metadata, MAX_PIXELS, MIN_SIDE).astype(int)
    b = heatmap_picture(_part10(inverted), metadata, MAX_PIXELS, MIN_SIDE).astype(int)
    assert a.shape == b.shape == (300, 500)
    assert np.abs(a + b - 255).max() <= 1
    assert a[0, 0] < 20 and a[-1, -1] > 235
    narrow = make_dataset(stored, sop_class=CR_STORAGE, modality="CR", window=(1024.0, 512.0))
    c = heatmap_picture(_part10(narrow), metadata, MAX_PIXELS, MIN_SIDE)
    assert not np.array_equal(a, c)  # the window is the source's own


def test_a_large_source_is_drawn_at_a_2048_px_short_side(metadata: ModelMetadata) -> None:
    stored = ramp(2100, 2600, high=4095)
    big = make_dataset(stored, sop_class=CR_STORAGE, modality="CR")
    picture = heatmap_picture(_part10(big), metadata, MAX_PIXELS, MIN_SIDE)
    assert picture.shape == (2048, 2536)


@pytest.mark.parametrize("answers", ["all", "positive"])
def test_the_setting_makes_a_heat_map_for_every_answer_or_only_positives(
    answers: str,
) -> None:
    from tests.app.pacs.pacs_results import factory_source

    source = factory_source()
    for probability in (0.9, 0.2):
        facts = make_facts(probability=probability)
        objects = render_objects(
            source,
            facts,
            grey_u8(),
            heatmap_answers=answers,  # type: ignore[arg-type]
        )
        expected = ["sr", "sc"] if facts.positive or answers == "all" else ["sr"]
        assert [o.kind for o in objects] == expected
