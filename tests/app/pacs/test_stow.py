"""The STOW-RS core: media types, multipart framing, per-instance outcomes and the Store
Instances Response, with instances from the test factory and a real spool behind `accept`."""

from __future__ import annotations

import io
import json
import time
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from app.pacs import stow
from app.pacs.spool import Spool
from app.pacs.stow import (
    MalformedRequest,
    StoreResponse,
    UnreadableInstance,
    UnsupportedMediaType,
    iter_parts,
    parse_content_type,
    read_instance_header,
    store_instances,
)
from app.testing import dicom_files as factory
from tests.app.pacs.intake_tools import chest_gate, instance, unique_uid

BOUNDARY = "0f3cf5c0-70e0-41ef-baef-c6f9f65ec3e1"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'
OTHER_STUDY = "1.2.826.0.1.3680043.10.1001.77"


def multipart(
    parts: list[bytes], boundary: str = BOUNDARY, part_type: str | None = "application/dicom"
) -> bytes:
    chunks = []
    for data in parts:
        headers = f"Content-Type: {part_type}\r\n" if part_type else ""
        chunks.append(f"--{boundary}\r\n{headers}\r\n".encode() + data + b"\r\n")
    return b"".join(chunks) + f"--{boundary}--\r\n".encode()


class SpoolSink:
    """`accept` backed by a real spool; remembers what it was given."""

    def __init__(self, spool: Spool):
        self.spool = spool
        self.accepted: list[bytes] = []

    def __call__(self, ds: Dataset, data: bytes) -> None:
        self.spool.put(str(ds.SOPInstanceUID), data, {"source": "stow"})
        self.accepted.append(data)


@pytest.fixture
def sink(tmp_path: Path) -> SpoolSink:
    return SpoolSink(Spool(tmp_path / "spool", max_entries=100, max_bytes=10**9))


def good(n: int, **options: object) -> bytes:
    return instance("explicit_le", sop_instance_uid=unique_uid(2, n), **options)  # type: ignore[arg-type]


def ct(n: int) -> bytes:
    return instance(
        "explicit_le", sop_instance_uid=unique_uid(3, n), modality="CT",
        sop_class=factory.CT_STORAGE, body_part="CHEST",
    )  # fmt: skip


def sequence(response: StoreResponse, tag: str) -> list[dict[str, object]]:
    element = response.dicom_json().get(tag, {})
    return list(element.get("Value", []))


def reasons(response: StoreResponse) -> list[int]:
    return [item["00081197"]["Value"][0] for item in sequence(response, "00081198")]  # type: ignore[index]


# -- media type ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"',
        f"multipart/related; type=application/dicom; boundary={BOUNDARY}",
        f'Multipart/Related;Type="Application/DICOM";Boundary={BOUNDARY}',
        f"multipart/related; boundary={BOUNDARY}; type=application/dicom",
        f"multipart/related; boundary={BOUNDARY}",  # type omitted: tolerated
        f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"; '
        'transfer-syntax="1.2.840.10008.1.2.4.90"',
    ],
)
def test_the_boundary_is_read_quoted_or_not(value: str) -> None:
    assert parse_content_type(value) == BOUNDARY


def test_a_quoted_boundary_may_hold_characters_a_token_cannot() -> None:
    assert parse_content_type('multipart/related; boundary="a b:c?d"') == "a b:c?d"


@pytest.mark.parametrize(
    "value",
    [
        'multipart/related; type="application/dicom+json"; boundary=x',
        "multipart/related; type=application/dicom+xml; boundary=x",
        "multipart/form-data; boundary=x",
        "application/dicom",
        "",
        "not a media type",
    ],
)
def test_other_media_types_are_415(value: str) -> None:
    with pytest.raises(UnsupportedMediaType) as caught:
        parse_content_type(value)
    assert caught.value.status == 415


def test_orthancs_73_character_boundary_is_taken() -> None:
    """Orthanc 1.10's DICOMweb client joins two UUIDs (73 characters, over RFC 2046's 70)."""
    boundary = "401c2c32-47ac-4ed1-a135-fc603335eadb-401c2c32-47ac-4ed1-a135-fc603335eadb"
    value = f'multipart/related; type="application/dicom"; boundary={boundary}'
    assert parse_content_type(value) == boundary


@pytest.mark.parametrize(
    "value",
    [
        'multipart/related; type="application/dicom"',
        'multipart/related; type="application/dicom"; boundary=""',
        "multipart/related; type=application/dicom; boundary=" + "x" * 201,
        'multipart/related; type="application/dicom"; boundary',
    ],
)
def test_a_missing_or_invalid_boundary_is_400(value: str) -> None:
    with pytest.raises(MalformedRequest) as caught:
        parse_content_type(value)
    assert caught.value.status == 400


# -- framing ---------------------------------------------------------------------------------


def test_parts_come_back_with_their_headers_and_exact_bytes() -> None:
    payloads = [b"first\r\n--not-the-boundary", b"", b"\r\nthird\r\n"]
    body = b"a preamble\r\n" + multipart(payloads)
    parts = list(iter_parts(body, BOUNDARY))
    assert [p.data for p in parts] == payloads
    assert [p.content_type for p in parts] == ["application/dicom"] * 3


def test_transport_padding_and_a_part_without_headers() -> None:
    body = f"--{BOUNDARY}  \r\n\r\nDATA\r\n--{BOUNDARY}--".encode()
    [part] = iter_parts(body, BOUNDARY)
    assert part.data == b"DATA" and part.headers == {}


@pytest.mark.parametrize(
    "body",
    [
        b"no boundary anywhere",
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\nDATA".encode(),  # no close
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\nDATA\r\n--{BOUNDARY}--".encode(),
        f"--{BOUNDARY}--\r\n".encode(),  # no part at all
        f"--{BOUNDARY}garbage\r\n\r\nDATA\r\n--{BOUNDARY}--".encode(),
        f"--{BOUNDARY}\r\nno colon here\r\n\r\nDATA\r\n--{BOUNDARY}--".encode(),
    ],
)
def test_broken_framing_is_400_and_stores_nothing(body: bytes, sink: SpoolSink) -> None:
    with pytest.raises(MalformedRequest):
        store_instances(body, CONTENT_TYPE, gate=chest_gate, accept=sink)
    assert len(sink.spool) == 0


def test_a_good_instance_before_broken_framing_is_not_stored(sink: SpoolSink) -> None:
    body = multipart([good(1)])[: -len(f"--{BOUNDARY}--\r\n")]  # the close delimiter cut off
    with pytest.raises(MalformedRequest):
        store_instances(body, CONTENT_TYPE, gate=chest_gate, accept=sink)
    assert sink.accepted == [] and len(sink.spool) == 0


# -- outcomes ----------------------------------------------------------------------------------


def test_all_stored_is_200_with_retrieve_urls(sink: SpoolSink) -> None:
    files = [good(1), good(2)]
    response = store_instances(
        multipart(files), CONTENT_TYPE, gate=chest_gate, accept=sink,
        study_url="/dicomweb/studies/" + factory.STUDY_UID,
        instance_url=lambda study, series, sop: f"/results/{sop}",
    )  # fmt: skip
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/dicom+json"
    assert sink.accepted == files  # the exact bytes of each part
    assert len(sink.spool) == 2
    items = sequence(response, "00081199")
    assert [i["00081155"]["Value"] for i in items] == [[unique_uid(2, 1)], [unique_uid(2, 2)]]  # type: ignore[index]
    assert [i["00081190"]["Value"] for i in items] == [  # type: ignore[index]
        [f"/results/{unique_uid(2, 1)}"],
        [f"/results/{unique_uid(2, 2)}"],
    ]
    assert "00081198" not in response.dicom_json()
    document = Dataset.from_json(json.loads(response.body))
    assert document.RetrieveURL == "/dicomweb/studies/" + factory.STUDY_UID
    assert document.ReferencedSOPSequence[0].ReferencedSOPClassUID == factory.CR_STORAGE


def test_good_ct_garbage_is_202_with_one_stored_and_two_failed(sink: SpoolSink) -> None:
    response = store_instances(
        multipart([good(1), ct(1), b"\x00garbage, not DICOM" * 40]),
        CONTENT_TYPE, gate=chest_gate, accept=sink,
    )  # fmt: skip
    assert response.status == 202
    [stored] = sequence(response, "00081199")
    assert stored["00081155"]["Value"] == [unique_uid(2, 1)]  # type: ignore[index]
    assert reasons(response) == [0x0122, 0xC000]
    failed = sequence(response, "00081198")
    assert failed[0]["00081150"]["Value"] == [factory.CT_STORAGE]  # type: ignore[index]
    assert failed[0]["00081155"]["Value"] == [unique_uid(3, 1)]  # type: ignore[index]
    assert "00081155" not in failed[1]  # garbage has no UID to report
    assert len(sink.spool) == 1
    assert [o.detail for o in response.outcomes] == ["stored", "not_intended_use", "unreadable"]
    # pydicom reads our response: the failure reasons survive the DICOM JSON round trip
    document = Dataset.from_json(json.loads(response.body))
    assert [i.FailureReason for i in document.FailedSOPSequence] == [0x0122, 0xC000]


def test_a_lateral_chest_is_not_intended_use(sink: SpoolSink) -> None:
    response = store_instances(
        multipart([good(1, view="LL")]), CONTENT_TYPE, gate=chest_gate, accept=sink
    )
    assert response.status == 409 and reasons(response) == [0x0122]


def test_a_study_mismatch_is_a901_and_the_matching_one_is_stored(sink: SpoolSink) -> None:
    other = instance("explicit_le", sop_instance_uid=unique_uid(2, 9), study_uid=OTHER_STUDY)
    response = store_instances(
        multipart([good(1), other]), CONTENT_TYPE, gate=chest_gate, accept=sink,
        study=factory.STUDY_UID,
    )  # fmt: skip
    assert response.status == 202
    assert reasons(response) == [0xA901]
    alone = store_instances(
        multipart([other]), CONTENT_TYPE, gate=chest_gate, accept=sink, study=factory.STUDY_UID
    )
    assert alone.status == 409 and reasons(alone) == [0xA901]
    assert len(sink.spool) == 1


def test_a_study_in_the_path_that_is_not_a_uid_is_400(sink: SpoolSink) -> None:
    with pytest.raises(MalformedRequest):
        store_instances(
            multipart([good(1)]), CONTENT_TYPE, gate=chest_gate, accept=sink, study="../x"
        )


def test_a_part_of_another_type_fails_on_its_own(sink: SpoolSink) -> None:
    body = multipart([good(1)])[: -len(f"--{BOUNDARY}--\r\n")] + multipart(
        [b"\xff\xd8 a jpeg"], part_type="image/jpeg"
    )
    response = store_instances(body, CONTENT_TYPE, gate=chest_gate, accept=sink)
    assert response.status == 202
    assert reasons(response) == [0xC000]
    assert response.outcomes[1].detail == "part_not_application_dicom"


def test_a_part_without_content_type_is_read_as_dicom(sink: SpoolSink) -> None:
    response = store_instances(
        multipart([good(1)], part_type=None), CONTENT_TYPE, gate=chest_gate, accept=sink
    )
    assert response.status == 200 and len(sink.spool) == 1


def test_missing_identifiers(sink: SpoolSink) -> None:
    ds = factory.make_dataset(factory.ramp(), modality="CR", sop_class=factory.CR_STORAGE)
    del ds.SeriesInstanceUID
    no_series = factory.encode_dataset(ds)
    ds = factory.make_dataset(factory.ramp(), modality="CR", sop_class=factory.CR_STORAGE)
    del ds.SOPInstanceUID
    no_instance = factory.encode_dataset(ds)
    response = store_instances(
        multipart([no_series, no_instance]), CONTENT_TYPE, gate=chest_gate, accept=sink
    )
    assert response.status == 409 and reasons(response) == [0xA900, 0xC000]


def test_a_file_without_preamble_and_prefix_is_not_part10(sink: SpoolSink) -> None:
    headless = good(1)[132:]  # file meta and data set, without the preamble and "DICM"
    response = store_instances(multipart([headless]), CONTENT_TYPE, gate=chest_gate, accept=sink)
    assert response.status == 409 and reasons(response) == [0xC000]
    assert len(sink.spool) == 0


def test_a_full_spool_fails_the_instance_a700_and_a_whole_request_503(tmp_path: Path) -> None:
    sink = SpoolSink(Spool(tmp_path, max_entries=1, max_bytes=10**9))
    partly = store_instances(
        multipart([good(1), good(2)]), CONTENT_TYPE, gate=chest_gate, accept=sink
    )
    assert partly.status == 202 and reasons(partly) == [0xA700]
    full = store_instances(
        multipart([good(3), good(4)]), CONTENT_TYPE, gate=chest_gate, accept=sink
    )
    assert full.status == 503
    assert full.headers["Retry-After"] == str(stow.RETRY_AFTER_SECONDS)
    assert reasons(full) == [0xA700, 0xA700]
    assert len(sink.spool) == 1


def test_a_failing_queue_or_gate_is_a_processing_failure(sink: SpoolSink) -> None:
    def broken_accept(ds: Dataset, data: bytes) -> None:
        raise OSError("disk gone")

    def broken_gate(ds: Dataset) -> str | None:
        raise KeyError("a bug")

    failed = store_instances(
        multipart([good(1)]), CONTENT_TYPE, gate=chest_gate, accept=broken_accept
    )
    assert failed.status == 409 and reasons(failed) == [0x0110]
    gated = store_instances(multipart([good(1)]), CONTENT_TYPE, gate=broken_gate, accept=sink)
    assert gated.status == 409 and reasons(gated) == [0x0110]


@pytest.mark.parametrize("syntax", sorted(factory.SYNTAXES))
def test_every_transfer_syntax_is_accepted(syntax: str, sink: SpoolSink) -> None:
    data = instance(syntax, sop_instance_uid=unique_uid(4, 1))
    response = store_instances(multipart([data]), CONTENT_TYPE, gate=chest_gate, accept=sink)
    assert response.status == 200
    assert sink.accepted == [data]


def test_a_deflate_bomb_is_refused_without_inflating_it() -> None:
    data = instance("deflated", sop_instance_uid=unique_uid(4, 2))
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.file_meta.TransferSyntaxUID == factory.SYNTAXES["deflated"]
    with pytest.raises(UnreadableInstance, match="inflates past"):
        read_instance_header(data, max_inflated_bytes=1000)
    assert read_instance_header(data).SOPInstanceUID == unique_uid(4, 2)
    # a hostile stream: 64 MiB of zeros compressed to ~64 KiB after a valid file meta group
    bomb = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    payload = bomb.compress(b"\x00" * (64 * 1024 * 1024)) + bomb.flush()
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
    with pytest.raises(UnreadableInstance):
        read_instance_header(data[:meta_end] + payload, max_inflated_bytes=1024 * 1024)


def test_a_20_mib_body_of_two_instances_parses_in_well_under_a_second(sink: SpoolSink) -> None:
    big = np.arange(2300 * 2300, dtype=np.uint32).astype(np.uint16).reshape(2300, 2300) & 0x0FFF
    files = [
        instance("explicit_le", sop_instance_uid=unique_uid(5, n), stored=big, bits_stored=12)
        for n in range(2)
    ]
    body = multipart(files)
    assert len(body) > 20 * 1024 * 1024
    accepted: list[bytes] = []
    start = time.perf_counter()
    response = store_instances(
        body, CONTENT_TYPE, gate=chest_gate, accept=lambda ds, data: accepted.append(data)
    )
    elapsed = time.perf_counter() - start
    assert response.status == 200 and accepted == files
    # A copy per byte scanned would take minutes; 20 MiB parse in ~15 ms on an idle core, and the
    # bound leaves room for a machine busy with other work.
    assert elapsed < 2.0, f"{elapsed:.3f} s for {len(body)} bytes"


def test_many_small_parts_scale_linearly() -> None:
    def timed(count: int) -> float:
        body = multipart([b"x" * 1000] * count)
        start = time.perf_counter()
        assert len(list(iter_parts(body, BOUNDARY))) == count
        return time.perf_counter() - start

    # The best of three runs each, so that a busy machine does not decide it; quadratic parsing
    # would take 100x the time for 10x the parts.
    small = min(timed(2000) for _ in range(3))
    large = min(timed(20000) for _ in range(3))
    assert large < small * 10 * 5 + 0.05, (small, large)
