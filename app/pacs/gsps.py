"""A Grayscale Softcopy Presentation State (GSPS) of a positive answer's attention region.

The SR of a positive answer with a class activation map outlines the map's peak (its hottest cell)
on the source image; the GSPS carries the same outline as a graphic annotation, so that a PACS
viewer that shows presentation states draws it over the original image, at the original's own
pixels, without a report viewer. It references the source image (Referenced Series Sequence), and
displays it as the model saw it: the source's Rescale Slope/Intercept, then the VOI the display
pipeline applied to make the model input (the answer's `dicom.window`: the source's window, its
VOI LUT, or the full range of its values as a LINEAR_EXACT window; composed with the source's
Modality LUT Sequence into one VOI LUT where it has one), then the polarity (INVERSE for
MONOCHROME1 or an INVERSE source), so that the grey levels match the model input and the heat
map.

The annotation is in a layer of its own, "AI ATTENTION": a closed POLYLINE around the region in
PIXEL units (the SR's outline, point for point), a short label anchored at it ("AI attention map
region, not a detection") and a text box along the image edge farther from the region with what
it is, the answer (verdict, probability and threshold), the model and the research-use
disclaimer.

Made only where the SR carries a region (`wants_gsps`: a positive answer with the positive class's
map); for a study's result, one per image whose region the study SR carries (`build_study_gsps`).
Like the other objects, it is a function of the source and the reading, never of the clock: every
date and time is the source's (`ObjectTime`), and its UIDs come from `app.pacs.uids` (kind
"gsps"), so the same reading renders the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.valuerep import format_number_as_ds

from app.imaging.dicom.display import lut_values, modality_values, window_function
from app.imaging.dicom.values import is_signed
from app.imaging.types import AppliedWindow
from app.pacs.objects import (
    MANUFACTURER,
    REGION_MEANING,
    ObjectTime,
    ResultFacts,
    StudyImage,
    _builder_view,
    _contributing_equipment,
    _evidence_view,
    _explicit_le,
    _hottest_cell_polygon,
    _keep_filing_only,
    _shows_region,
    _stamp,
    encode,
    summary_text,
)
from app.pacs.outbox import ResultObject
from app.pacs.uids import (
    result_instance_uid,
    result_series_uid,
    study_image_result_instance_uid,
    study_result_series_uid,
)

GRAYSCALE_SOFTCOPY_PRESENTATION_STATE = "1.2.840.10008.5.1.4.1.1.11.1"
GSPS_SERIES_NUMBER = 903
GSPS_SERIES_DESCRIPTION = "AI ATTENTION REGION - RESEARCH USE ONLY"
# Presentation State Identification: Content Label (CS) and Content Description (LO, 64)
CONTENT_LABEL = "AI_ATTENTION"
CONTENT_DESCRIPTION = "AI attention map region, not a detection; research use only"
# Graphic Layer (CS, 16) and its description (LO, 64)
LAYER_NAME = "AI ATTENTION"
LAYER_DESCRIPTION = "AI attention map region (CAM peak), not a detection"
# The label beside the outline
REGION_LABEL = "AI attention map region, not a detection"
# Yellow in CIELab (PS3.3 C.10.7.1.1: L*, a*, b*): the layer's recommended display colour
_YELLOW = hd.color.CIELabColor(97.1, -21.6, 94.5)
# Unformatted Text Value is ST
_TEXT_LIMIT = 1024


def wants_gsps(facts: ResultFacts) -> bool:
    """Whether an answer gets a GSPS: exactly when its SR carries the attention region (a
    positive answer with the positive class's map)."""
    return _shows_region(facts)


def applied_window(answer: Mapping[str, Any]) -> AppliedWindow | None:
    """The VOI the display pipeline applied to make the model input, from a `/predict` JSON
    answer's `dicom.window`; None when the answer has none."""
    window = (answer.get("dicom") or {}).get("window")
    if not isinstance(window, Mapping) or window.get("source") not in (
        "window",
        "voi_lut_sequence",
        "full_range",
    ):
        return None

    def number(key: str) -> float | None:
        value = window.get(key)
        return float(value) if isinstance(value, int | float) else None

    function = window.get("function")
    return AppliedWindow(
        source=str(window["source"]),
        center=number("center"),
        width=number("width"),
        function=str(function) if function else None,
    )


def gsps_text(facts: ResultFacts) -> str:
    """The text box: what the outline is, the answer, the model and the disclaimer."""
    text = (
        f"{REGION_LABEL}: {REGION_MEANING}. AI answer: {summary_text(facts)}. "
        f"{facts.model_name} {facts.model_version}. {facts.disclaimer}"
    )
    return text[:_TEXT_LIMIT]


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def _lut_transformation(lut: Dataset) -> hd.pr.SoftcopyVOILUTTransformation:
    """A Softcopy VOI LUT of one VOI LUT Sequence item (`lut`, already as a presentation state
    takes it)."""
    # highdicom's VOILUT takes its bits from its array's dtype: a placeholder, replaced by `lut`
    placeholder = hd.VOILUT(first_mapped_value=0, lut_data=np.zeros(2, dtype=np.uint16))
    transformation = hd.pr.SoftcopyVOILUTTransformation(voi_luts=[placeholder])
    transformation.VOILUTSequence[0].clear()
    transformation.VOILUTSequence[0].update(lut)
    return transformation


def _as_16_bits(table: np.ndarray, entries: int, first: int, explanation: str | None) -> Dataset:
    """A VOI LUT item of 16-bit entries (a presentation state's LUTs are 8 or 16 bits), `table`
    being the output as a fraction of the full range."""
    lut = Dataset()
    lut.add_new("LUTDescriptor", "US", [entries % 65536, first % 65536, 16])
    if explanation:
        lut.LUTExplanation = explanation[:64]
    values = np.rint(np.clip(table, 0.0, 1.0) * 65535.0).astype("<u2")
    lut.add_new("LUTData", "OW", values.tobytes())
    return lut


def _voi_fraction(x: np.ndarray, source: Dataset, window: AppliedWindow) -> np.ndarray | None:
    """The display pipeline's VOI output (0 to 1) of modality values `x` under `window`."""
    if window.source == "voi_lut_sequence":
        items = source.get("VOILUTSequence") or []
        if not items:
            return None
        table, first, bits = lut_values(items[0], is_signed(source))
        index = np.clip(np.floor(x) - first, 0, table.size - 1).astype(np.intp)
        fraction: np.ndarray = np.minimum(table[index] / float(2**bits - 1), 1.0)
        return fraction
    if window.center is None or window.width is None:
        return None
    if window.source == "full_range":
        if window.width <= 0:
            return np.zeros_like(x)
        return np.clip((x - window.center) / window.width + 0.5, 0.0, 1.0)
    return window_function(x, window.center, window.width, (window.function or "LINEAR").upper())


def _folded_voi(
    source: Dataset, window: AppliedWindow
) -> hd.pr.SoftcopyVOILUTTransformation | None:
    """The source's Modality LUT Sequence and the VOI as one VOI LUT over its stored values.

    A presentation state's Modality LUT has 8- or 16-bit entries, and a source's (12 bits, say)
    widened to 16 reads to dciodvfy as a wrong descriptor; the composition, a 16-bit VOI LUT
    indexed by stored value with no Modality LUT, is the same display without that question."""
    bits = int(source.get("BitsStored") or source.get("BitsAllocated") or 16)
    signed = is_signed(source)
    first = -(1 << (bits - 1)) if signed else 0
    stored = np.arange(first, first + (1 << bits), dtype=np.float64)
    fraction = _voi_fraction(modality_values(stored, source), source, window)
    if fraction is None:
        return None
    lut = _as_16_bits(
        fraction, stored.size, first, "Modality LUT and VOI of the AI model input's rendering"
    )
    return _lut_transformation(lut)


def _voi(
    source: Dataset, window: AppliedWindow | None
) -> hd.pr.SoftcopyVOILUTTransformation | None:
    """The Softcopy VOI LUT of the model input's rendering (`app.imaging.dicom.display.voi`).

    - the source's window: its centre, width and VOI LUT Function, as applied;
    - the source's VOI LUT: its first item, its entries as 16 bits;
    - the full range [lo, hi] of the values: centre (lo + hi) / 2 and width hi - lo, LINEAR_EXACT,
      which gives (x - lo) / (hi - lo), the display pipeline's own formula; a constant image
      (hi = lo, shown all black) a window above its one value;
    - with a Modality LUT Sequence in the source, either of these composed with it
      (`_folded_voi`).

    None (no window known, or a VOI LUT the source no longer carries): the source's own VOI,
    which highdicom copies when the source has one.
    """
    if window is None:
        return None
    if len(source.get("ModalityLUTSequence") or []):
        return _folded_voi(source, window)
    if window.source == "voi_lut_sequence":
        items = source.get("VOILUTSequence") or []
        if not items:
            return None
        table, first, bits = lut_values(items[0], is_signed(source))
        explanation = items[0].get("LUTExplanation")
        lut = _as_16_bits(
            table / float(2**bits - 1), table.size, first, str(explanation) if explanation else None
        )
        return _lut_transformation(lut)
    if window.center is None or window.width is None:
        return None
    if window.source == "full_range":
        center, width = window.center, window.width
        if width <= 0:
            center, width = center + 1.0, 1.0
        return hd.pr.SoftcopyVOILUTTransformation(
            window_center=float(_ds(center)),
            window_width=float(_ds(width)),
            window_explanation="full range of the image's values, as the AI model saw it",
            voi_lut_function="LINEAR_EXACT",
        )
    return hd.pr.SoftcopyVOILUTTransformation(
        window_center=float(_ds(window.center)),
        window_width=float(_ds(window.width)),
        window_explanation="the image's window, as the AI model saw it",
        voi_lut_function=(window.function or "LINEAR").upper(),
    )


def _inverse(source: Dataset) -> bool:
    """Whether the display pipeline inverted the image: MONOCHROME1, or Presentation LUT Shape
    INVERSE (once, never twice)."""
    photometric = str(source.get("PhotometricInterpretation", "")).strip().upper()
    shape = str(source.get("PresentationLUTShape", "") or "").strip().upper()
    return photometric == "MONOCHROME1" or shape == "INVERSE"


def region_outline(source: Dataset, facts: ResultFacts) -> np.ndarray:
    """The attention region's closed outline in PIXEL units (column, row), the SR's own."""
    if facts.cam_grid is None:
        raise ValueError("an attention region needs the answer's CAM grid")
    return _hottest_cell_polygon(facts.cam_grid, int(source.Rows), int(source.Columns))


def _text_box(outline: np.ndarray, rows: int, columns: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the text box: along the top or bottom edge, whichever is
    farther from the region, inside the image, clear of the outline where the image allows."""
    margin = max(1.0, round(min(rows, columns) * 0.02))
    height = max(1.0, round(rows * 0.12))
    region_top, region_bottom = float(outline[:, 1].min()), float(outline[:, 1].max())
    left, right = margin, max(margin + 1.0, columns - 1.0 - margin)
    if region_top >= rows - 1.0 - region_bottom:
        top = margin
        bottom = min(top + height, max(top + 1.0, region_top - margin))
    else:
        bottom = rows - 1.0 - margin
        top = max(bottom - height, min(bottom - 1.0, region_bottom + margin))
    return left, top, right, bottom


def build_gsps(
    source: Dataset,
    facts: ResultFacts,
    window: AppliedWindow | None,
    *,
    series_number: int = GSPS_SERIES_NUMBER,
) -> Dataset:
    """The GSPS of a positive answer's attention region over `source` (module docstring).

    `window` is the VOI the model input was rendered with (`applied_window` of the answer)."""
    source_uid = str(source.SOPInstanceUID)
    model, profile, pixels = facts.model_sha256, facts.site_profile_sha256, facts.pixel_digest
    return _build(
        source,
        facts,
        window,
        series_uid=result_series_uid(source_uid, model, "gsps", profile, pixels),
        instance_uid=result_instance_uid(source_uid, model, "gsps", profile, pixels),
        series_number=series_number,
        instance_number=1,
    )


def _build(
    source: Dataset,
    facts: ResultFacts,
    window: AppliedWindow | None,
    *,
    series_uid: str,
    instance_uid: str,
    series_number: int,
    instance_number: int,
) -> Dataset:
    if not wants_gsps(facts):
        raise ValueError("a GSPS is made only for a positive answer with an attention region")
    # the intakes read single-frame images only: the annotation is on the image's one frame
    if int(source.get("NumberOfFrames", 1) or 1) != 1:
        raise ValueError("a GSPS is made for a single-frame source only")
    rows, columns = int(source.Rows), int(source.Columns)
    outline = region_outline(source, facts)
    evidence = _evidence_view(source)
    view = _builder_view(evidence)
    layer = hd.pr.GraphicLayer(
        layer_name=LAYER_NAME, order=1, description=LAYER_DESCRIPTION, display_color=_YELLOW
    )
    left, top = float(outline[:, 0].min()), float(outline[:, 1].min())
    annotation = hd.pr.GraphicAnnotation(
        referenced_images=[view],
        graphic_layer=layer,
        graphic_objects=[
            hd.pr.GraphicObject(
                graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                graphic_data=outline,
                units=hd.pr.AnnotationUnitsValues.PIXEL,
            )
        ],
        text_objects=[
            hd.pr.TextObject(
                text_value=REGION_LABEL,
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                anchor_point=(left, top),
                anchor_point_visible=True,
            ),
            hd.pr.TextObject(
                text_value=gsps_text(facts),
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                bounding_box=_text_box(outline, rows, columns),
                text_justification=hd.pr.TextJustificationValues.LEFT,
            ),
        ],
    )
    voi = _voi(source, window)
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[view],
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=facts.model_name[:64],
        software_versions=facts.model_version[:64],
        device_serial_number=facts.model_sha256[:64],
        content_label=CONTENT_LABEL,
        content_description=CONTENT_DESCRIPTION,
        graphic_annotations=[annotation],
        graphic_layers=[layer],
        voi_lut_transformations=[voi] if voi is not None else None,
        presentation_lut_transformation=hd.PresentationLUTTransformation(
            presentation_lut_shape=(
                hd.PresentationLUTShapeValues.INVERSE
                if _inverse(source)
                else hd.PresentationLUTShapeValues.IDENTITY
            )
        ),
        contributing_equipment=[_contributing_equipment(facts)],
        series_description=GSPS_SERIES_DESCRIPTION,
    )
    if len(source.get("ModalityLUTSequence") or []) and voi is not None:
        # the Modality LUT is in the folded VOI LUT (`_folded_voi`): none of its own
        for keyword in ("ModalityLUTSequence", "RescaleSlope", "RescaleIntercept", "RescaleType"):
            if keyword in gsps:
                delattr(gsps, keyword)
    gsps.copy_patient_and_study_information(evidence)
    _keep_filing_only(gsps)
    # dciodvfy's Type 2C rule on the General Series Laterality needs Body Part Examined present.
    gsps.BodyPartExamined = source.get("BodyPartExamined", "CHEST")
    when = ObjectTime.of_source(source)
    _stamp(gsps, when)
    # a presentation state has no Content Date/Time; its own is the Presentation Creation's
    for keyword in ("ContentDate", "ContentTime"):
        if keyword in gsps:
            delattr(gsps, keyword)
    gsps.PresentationCreationDate, gsps.PresentationCreationTime = when.date, when.time
    return _explicit_le(gsps)


def build_study_gsps(
    images: Sequence[StudyImage],
    windows: Mapping[str, AppliedWindow | None],
    images_digest: str,
) -> list[Dataset]:
    """The GSPS of each image whose attention region the study SR carries (`build_study_sr`), in
    one series per study and reading. Image N (in SOP Instance UID order, the study SR's "image
    N") gets instance number N, and UIDs from the study, the reading, the image set and the image
    (`app.pacs.uids.study_image_result_instance_uid`): another image set, another instance, as
    for the study SR. `windows` maps an image's SOP Instance UID to its model input's VOI."""
    ordered = sorted(images, key=lambda i: i.sop_instance_uid)
    made: list[Dataset] = []
    for number, image in enumerate(ordered, start=1):
        facts = image.facts
        if not wants_gsps(facts):
            continue
        study_uid = str(image.source.StudyInstanceUID)
        model, profile = facts.model_sha256, facts.site_profile_sha256
        made.append(
            _build(
                image.source,
                facts,
                windows.get(image.sop_instance_uid),
                series_uid=study_result_series_uid(study_uid, model, "gsps", profile),
                instance_uid=study_image_result_instance_uid(
                    study_uid, model, "gsps", profile, images_digest, image.sop_instance_uid
                ),
                series_number=GSPS_SERIES_NUMBER,
                instance_number=number,
            )
        )
    return made


def _encoded(datasets: Sequence[Dataset]) -> list[ResultObject]:
    return [
        ResultObject(
            kind="gsps",
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            payload=encode(ds),
        )
        for ds in datasets
    ]


def render_gsps(
    source: Dataset, facts: ResultFacts, window: AppliedWindow | None
) -> list[ResultObject]:
    """The encoded GSPS of an answer, ready for `Outbox.enqueue`, or none when the answer has no
    attention region (`wants_gsps`)."""
    return _encoded([build_gsps(source, facts, window)] if wants_gsps(facts) else [])


def render_study_gsps(
    images: Sequence[StudyImage],
    answers: Mapping[str, Mapping[str, Any]],
    images_digest: str,
) -> list[ResultObject]:
    """The encoded GSPS of a study's result (`build_study_gsps`); `answers` maps an image's SOP
    Instance UID to its JSON answer (whose `dicom.window` is its model input's VOI)."""
    windows = {uid: applied_window(answer) for uid, answer in answers.items()}
    return _encoded(build_study_gsps(images, windows, images_digest))
