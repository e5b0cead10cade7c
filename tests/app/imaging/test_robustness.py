"""Hostile DICOM never escapes the imaging stage as anything but a 4xx `ServiceError`.

The property is checked three ways: the two one-byte reproductions and every crash the fuzzer
found (`fuzz_regressions.txt`, each `fuzz-<seed>-<index>-<operator>-<syntax>`, rebuilt from the
deterministic fuzzer rather than committed as files) decode to a refusal; a bounded run of the
structure-aware fuzzer (`app.testing.fuzz`) goes through the real decode path the service runs
(`Classifier.open`, then `Classifier.prepare`); and the boundary itself converts a Rust panic and
passes what ends the process.
"""

from __future__ import annotations

import collections
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from app.errors import InvalidImage, ServiceError
from app.imaging.boundary import image_boundary
from app.model.classifier import Classifier
from app.model.loading import load_classifier
from app.testing.dicom_files import make_dicom, ramp
from app.testing.fuzz import OPERATORS, Layout, mutant, mutants, seed_files
from tests.support.testkit import make_settings, write_model_dir

REGRESSIONS = Path(__file__).parent / "fuzz_regressions.txt"
FUZZ_SEED = 20261201
FUZZ_MUTANTS = 1500


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Classifier:
    """The tiny model's classifier, with the service's own decode limits and DICOM policy."""
    model = write_model_dir(tmp_path_factory.mktemp("model"))
    return load_classifier(make_settings(model))


def outcome(classifier: Classifier, data: bytes) -> int:
    """200 when the upload becomes a model input, else the refusal's status; anything else that
    escapes fails the test with the exception itself."""
    try:
        classifier.prepare(classifier.open(data))
    except ServiceError as exc:
        assert exc.status_code in (415, 422), (exc.status_code, exc.code)
        return exc.status_code
    return 200


def transfer_syntax_digit_changed() -> bytes:
    """Explicit VR Little Endian's UID with its last digit changed: 1.2.840.10008.1.2.9."""
    data = make_dicom(ramp())
    assert data.count(b"1.2.840.10008.1.2.1\x00") == 1
    return data.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.9\x00")


def sop_instance_uid_vr_corrupted() -> bytes:
    """The VR bytes of (0008,0018) SOP Instance UID overwritten: "UI" becomes "QQ"."""
    data = make_dicom(ramp())
    position = data.find(b"\x08\x00\x18\x00UI", 132 + 64)  # after the meta group's (0002,0003)
    assert position > 0
    return data[: position + 4] + b"QQ" + data[position + 6 :]


def test_the_two_one_byte_reproductions_are_refused_as_invalid_images(
    classifier: Classifier,
) -> None:
    for data in (transfer_syntax_digit_changed(), sop_instance_uid_vr_corrupted()):
        with pytest.raises(InvalidImage) as excinfo:
            classifier.prepare(classifier.open(data))
        assert excinfo.value.status_code == 422
        # The exception's type is named, its message (which quotes header bytes) is not.
        assert "QQ" not in excinfo.value.message and "1.2.9" not in excinfo.value.message


def regression_mutants() -> list[tuple[str, bytes]]:
    """Each listed crash, rebuilt: the fuzzer is deterministic from seed and index, and the name's
    operator must still be the one that made it (else a fuzzer change has made the names lie)."""
    seeds = seed_files()
    found = []
    for line in REGRESSIONS.read_text(encoding="utf-8").splitlines():
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        _, seed, index, operator, _ = name.split("-", 4)
        made = mutant(seeds, int(seed), int(index))
        assert made.operators[0] == operator, name
        found.append((name, made.data))
    return found


def test_every_crash_the_fuzzer_found_is_refused(classifier: Classifier) -> None:
    cases = regression_mutants()
    assert len(cases) >= 20
    for name, data in cases:
        assert outcome(classifier, data) == 422, name


def test_a_rust_decoder_panic_is_an_invalid_image(classifier: Classifier) -> None:
    """pylibjpeg-rle panics (PyO3 `PanicException`, a BaseException) on an RLE header whose
    second segment starts inside the 64-byte header; that is still the upload's fault."""
    layout = Layout.parse(make_dicom(ramp(), "rle"))
    fragment = next(e for e in layout.body.elements if e.kind == "fragment")
    struct.pack_into("<I", layout.body.data, fragment.value_at + 8, 65)
    data = layout.to_bytes()
    with pytest.raises(InvalidImage, match=r"could not be decoded \(PanicException\)"):
        classifier.prepare(classifier.open(data))


def test_a_rescale_that_overflows_is_refused_not_rendered_as_noise(classifier: Classifier) -> None:
    # 1e308 * 4095 is inf, and the full-range window of it is inf/inf: NaN, which a cast to
    # uint8 would turn into an arbitrary grey answered as if it were the image.
    data = make_dicom(ramp(), rescale=(1e308, 0.0))
    with pytest.raises(InvalidImage, match="finite"):
        classifier.prepare(classifier.open(data))


def test_the_boundary_passes_only_what_ends_the_process() -> None:
    class Panic(BaseException):  # what PyO3 raises: not an Exception
        pass

    for raised in (Panic("header value 1.2.3"), KeyError("PatientName"), MemoryError()):
        with pytest.raises(InvalidImage) as excinfo, image_boundary("step failed"):
            raise raised
        assert excinfo.value.message == f"step failed ({type(raised).__name__})"
        assert excinfo.value.__suppress_context__  # the message stays out of logged tracebacks
    for passing in (KeyboardInterrupt(), SystemExit(1), GeneratorExit()):
        with pytest.raises(type(passing)), image_boundary("step failed"):
            raise passing
    refused = ServiceError("kept as it is")
    with pytest.raises(ServiceError) as kept, image_boundary("step failed"):
        raise refused
    assert kept.value is refused


def test_valid_seeds_all_decode(classifier: Classifier) -> None:
    """The fuzz starts from files the service answers: otherwise it would test refusals only."""
    for name, data in seed_files().items():
        assert outcome(classifier, data) == 200, name


def test_bounded_fuzz_through_the_real_decode_path(classifier: Classifier) -> None:
    """1,500 structure-aware mutants across every transfer syntax: each is answered or refused
    with a 4xx, every operator is exercised, and both answers and refusals occur."""
    seeds = seed_files()
    started = time.perf_counter()
    statuses: collections.Counter[int] = collections.Counter()
    operators: collections.Counter[str] = collections.Counter()
    for made in mutants(seeds, FUZZ_SEED, FUZZ_MUTANTS):
        try:
            statuses[outcome(classifier, made.data)] += 1
        except BaseException as exc:  # name the mutant, so that it can become a regression
            raise AssertionError(f"mutant {made.id} ({made.operators}) escaped: {exc!r}") from exc
        operators.update(made.operators)
    elapsed = time.perf_counter() - started
    assert sum(statuses.values()) == FUZZ_MUTANTS
    assert set(statuses) <= {200, 415, 422}
    assert statuses[200] > 100 and statuses[422] > 500, statuses
    assert all(operators[name] >= 20 for name in [*OPERATORS, "flip", "truncate"]), operators
    assert elapsed < 120, f"{FUZZ_MUTANTS} mutants took {elapsed:.0f}s"


def test_mutants_are_deterministic_and_differ_from_their_seed() -> None:
    seeds = seed_files()
    first = [m.data for m in mutants(seeds, 5, 50)]
    again = [mutant(seeds, 5, index).data for index in reversed(range(50))][::-1]
    assert first == again
    assert sum(data not in seeds.values() for data in first) >= 45
    assert np.unique([len(d) for d in first]).size > 10


def test_a_one_wide_linear_window_is_a_threshold_not_a_refusal(classifier: Classifier) -> None:
    """Window Width 1 is legal for LINEAR (PS3.3 C.11.2.1.2.1): a threshold at c - 0.5, which the
    finite-rendering check must not refuse."""
    stored = ramp()
    decoded = classifier.open(make_dicom(stored, window=(2048.5, 1.0))).decode()
    assert decoded.dicom is not None and decoded.dicom.window.source == "window"
    expected = np.where(stored > 2048, 255, 0).astype(np.uint8)
    assert np.array_equal(np.asarray(decoded.image), expected)


def test_fuzzed_j2k_frames_decoded_at_a_reduced_level_are_answered_or_refused() -> None:
    """The reduced JPEG 2000 path (the contract's `dicom_j2k_reduction`: its own header reader,
    Pillow's OpenJPEG) under 400 mutants of JPEG 2000 seeds: each is answered or refused with a
    4xx, and the path really runs (answers decoded smaller than stored)."""
    from app.contract import DicomRendering, IntendedUse
    from app.imaging.dicom import DicomPolicy
    from app.imaging.formats import DecodeLimits, decode_upload
    from tests.support.testkit import DICOM_RENDERING, INTENDED_USE

    policy = DicomPolicy(
        rendering=DicomRendering.model_validate(DICOM_RENDERING),
        intended_use=IntendedUse.model_validate(INTENDED_USE),
        j2k_level=lambda width, height, levels, wavelet: min(2, levels),
    )
    stored = ramp(rows=260, columns=300)
    seeds = {
        f"{syntax}_{photometric}": make_dicom(
            stored.copy(), syntax, bits_stored=12, photometric=photometric
        )
        for syntax in ("j2k_lossless", "j2k")
        for photometric in ("MONOCHROME2", "MONOCHROME1")
    }
    statuses: collections.Counter[str] = collections.Counter()
    for made in mutants(seeds, FUZZ_SEED, 400):
        try:
            decoded = decode_upload(
                made.data, DecodeLimits(max_pixels=50_000_000, min_side=64), policy
            )
            statuses["reduced" if decoded.stored_size is not None else "full"] += 1
        except ServiceError as exc:
            assert exc.status_code in (415, 422), (made.id, exc.status_code)
            statuses[str(exc.status_code)] += 1
        except BaseException as exc:
            raise AssertionError(f"mutant {made.id} ({made.operators}) escaped: {exc!r}") from exc
    assert statuses["reduced"] > 50 and statuses["422"] > 100, statuses
