"""One durable pipeline from a DICOM X-ray to its result objects in the hospital's PACS.

Three ways in, one way out:

- `POST /predict?deliver=true`: the image has just been classified; `record` renders the result
  objects (the SR, the heat-map SC when configured, and the attention region's GSPS beside a
  positive SR's region) and puts them in the outbox before the request is answered.
- STOW-RS (`POST /dicomweb/studies`) and the C-STORE listener: an accepted instance is written to
  the intake spool before its sender is told it was stored; `_read_spool` tasks then classify it
  through the same prediction step as `/predict` (its admission limit, decode threads and batching
  engine) and `record` it.
- Out: the `DeliveryWorker` thread sends each object to every configured destination (STOW-RS,
  C-STORE) until delivered or given up, and `GET /results/{SOPInstanceUID}` reads the outbox.
  With a RIS configured, the same result is also rendered as an HL7 ORU^R01 (`app.pacs.hl7`) and/or
  a FHIR transaction Bundle (`app.pacs.fhir`), stored in the same transaction, and routed to the
  MLLP or FHIR destination only (the DICOM objects to the PACS destinations only); a RIS needs no
  PACS destination.

The answer JSON is the source of truth; every object is a rendering of it (`app.pacs.objects`).
A spooled image that turns out to be outside the model's intended use, or unreadable, is taken off
the spool with no result and counted (`stats`); the senders were told "stored", which they were.
Nothing here logs a header value: log lines carry outcome codes and counts only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from app.contract import ModelMetadata
from app.errors import Overloaded, ServiceError
from app.imaging.dicom import DicomPolicy, intended_use_refusal, open_dicom
from app.pacs.delivery import DeliveryWorker, Destination, DimseDestination, StowRsDestination
from app.pacs.fhir import FhirDestination, FhirProfile, render_bundle
from app.pacs.gsps import applied_window, render_gsps, render_study_gsps
from app.pacs.hl7 import Hl7Profile, MllpDestination, render_oru
from app.pacs.objects import (
    ResultFacts,
    SetAsideImage,
    StudyImage,
    deciding_image,
    heatmap_base,
    render_objects,
    render_study_objects,
    wants_heatmap,
)
from app.pacs.outbox import Outbox, ResultObject, StoredResult
from app.pacs.ris import FHIR_KIND, HL7_KIND, OrderFacts
from app.pacs.scp import StorageListener
from app.pacs.spool import Spool, SpoolEntry
from app.pacs.stow import read_instance_header
from app.pacs.study import ImageReading, StudyLedgers, study_answer
from app.pacs.uids import (
    pixel_data_digest,
    result_key,
    result_key_prefix,
    study_result_key,
    study_result_key_prefix,
)
from app.serving.prediction import Prediction, PredictionStep
from app.settings import Settings

logger = logging.getLogger(__name__)

# What turns a prediction into the JSON answer (the HTTP layer's shaping, handed in by the
# composition root so that this layer does not depend on HTTP): (prediction, request id) -> JSON.
AnswerShaper = Callable[[Prediction, str], dict[str, Any]]

DICOMWEB = "dicomweb"
DIMSE = "dimse"
HL7 = "hl7"
FHIR = "fhir"
# A C-STORE handler only writes the spool; readers look for new entries this often.
_IDLE_POLL_S = 0.2
# A study result the outbox could not store is tried again after this long.
_STUDY_RETRY_S = 30.0
# Ledgers of studies made and quiet for the retention time are looked for this often.
_STUDY_PRUNE_EVERY_S = 600.0


class StudyNotStored(Exception):
    """A study's result was built but the outbox did not store it (its cause says why)."""


@dataclass(frozen=True)
class RecordedResult:
    """What the answer says about its result objects.

    `stored` is the result as the outbox holds it after `record`: the answer the objects were
    rendered from and the deliveries. For an image already read (the same pixel data under the
    same UID, model and profile) that is the first answer, which is what was delivered; callers
    answer with it, so that a client is never told other than what its PACS receives."""

    result_key: str
    source_sop_instance_uid: str
    objects: list[ResultObject]
    destinations: list[str]
    stored: StoredResult


def destinations_from(settings: Settings) -> list[Destination]:
    """The configured destinations, named by kind (the names are metric labels)."""
    found: list[Destination] = []
    if settings.results_dicomweb_url:
        auth = settings.results_dicomweb_auth
        ca = settings.results_dicomweb_ca_file
        tls = None
        if ca is not None or settings.results_dicomweb_client_cert is not None:
            tls = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
            if settings.results_dicomweb_client_cert is not None:
                tls.load_cert_chain(
                    settings.results_dicomweb_client_cert, settings.results_dicomweb_client_key
                )
        found.append(
            StowRsDestination(
                settings.results_dicomweb_url,
                name=DICOMWEB,
                auth_header=auth.get_secret_value() if auth else None,
                tls=tls,
            )
        )
    if settings.results_dimse:
        found.append(
            DimseDestination.parse(
                settings.results_dimse, name=DIMSE, calling_ae_title=settings.dicom_ae_title
            )
        )
    if settings.results_hl7:
        found.append(
            MllpDestination.parse(
                settings.results_hl7, name=HL7, ack_timeout_s=settings.results_hl7_ack_timeout_s
            )
        )
    if settings.results_fhir_url:
        token = settings.results_fhir_auth
        found.append(
            FhirDestination(
                settings.results_fhir_url,
                name=FHIR,
                auth_header=token.get_secret_value() if token else None,
                client_cert=settings.results_fhir_client_cert,
                client_key=settings.results_fhir_client_key,
                ca_file=settings.results_fhir_ca_file,
            )
        )
    return found


def hl7_profile_from(settings: Settings) -> Hl7Profile:
    return Hl7Profile(
        sending_application=settings.results_hl7_sending_application,
        sending_facility=settings.results_hl7_sending_facility,
        receiving_application=settings.results_hl7_receiving_application,
        receiving_facility=settings.results_hl7_receiving_facility,
        accession_in=settings.hl7_accession_in,
        priority_fields=settings.hl7_priority_fields,
        positive_priority=settings.results_hl7_positive_priority,
        negative_priority=settings.results_hl7_negative_priority,
    )


def fhir_profile_from(settings: Settings) -> FhirProfile:
    return FhirProfile(
        patient_id_system=settings.results_fhir_patient_id_system,
        accession_system=settings.results_fhir_accession_system,
    )


def render_messages(
    source: Dataset,
    facts: ResultFacts,
    key: str,
    warnings: list[str],
    hl7: Hl7Profile | None,
    fhir: FhirProfile | None,
) -> list[ResultObject]:
    """The RIS renderings of one result: the ORU^R01 when `hl7` is given, the Bundle when
    `fhir` is."""
    order = OrderFacts.of_source(source)
    messages = []
    if hl7 is not None:
        messages.append(render_oru(order, facts, key, hl7, warnings=warnings))
    if fhir is not None:
        messages.append(render_bundle(order, facts, key, fhir, warnings=warnings))
    return messages


class ResultsPipeline:
    """The outbox, its delivery worker, the intake spool and the C-STORE listener of one process.
    Built by the lifespan once the model is ready; `start` on the serving event loop."""

    def __init__(
        self,
        settings: Settings,
        step: PredictionStep,
        shape_answer: AnswerShaper,
        destinations: list[Destination] | None = None,
    ) -> None:
        if settings.state_dir is None:
            raise ValueError("the results pipeline needs CXR_STATE_DIR")
        self.settings = settings
        self.step = step
        self.metadata: ModelMetadata = step.classifier.metadata
        profile = step.classifier.site_profile
        # Results are kept per reading: the same image under another site profile is another one.
        self.site_profile_sha256 = profile.sha256 if profile is not None else None
        self._shape = shape_answer
        state_dir = Path(settings.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        url = settings.state_url.get_secret_value() if settings.state_url else None
        self.outbox = Outbox.open(
            state_dir,
            url,
            lease_s=settings.results_lease_s,
            give_up_after_s=settings.results_give_up_after_s,
        )
        self.destinations = (
            destinations if destinations is not None else destinations_from(settings)
        )
        # Which destination takes which kind of object: RIS messages to their RIS, the DICOM
        # objects to the PACS destinations.
        self._ris_names = {
            HL7_KIND: [d.name for d in self.destinations if isinstance(d, MllpDestination)],
            FHIR_KIND: [d.name for d in self.destinations if isinstance(d, FhirDestination)],
        }
        ris = {name for names in self._ris_names.values() for name in names}
        self._pacs_names = [d.name for d in self.destinations if d.name not in ris]
        self.hl7_profile = hl7_profile_from(settings) if self._ris_names[HL7_KIND] else None
        self.fhir_profile = fhir_profile_from(settings) if self._ris_names[FHIR_KIND] else None
        self.worker = (
            DeliveryWorker(
                self.outbox,
                self.destinations,
                max_backoff_s=settings.results_max_backoff_s,
                retention_s=settings.results_retention_s,
                poll_interval_s=0.5,
            )
            if self.destinations
            else None
        )
        self.spool = Spool(
            state_dir / "intake", settings.intake_max_pending, settings.intake_max_pending_bytes
        )
        self.listener = (
            StorageListener(
                spool=self.spool,
                gate=self.gate,
                port=settings.dicom_port,
                ae_title=settings.dicom_ae_title,
                host=settings.dicom_host,
                allowed_calling_aets=settings.allowed_calling_aets,
                max_associations=settings.dicom_max_associations,
            )
            if settings.dicom_port is not None
            else None
        )
        # Why the C-STORE listener is not listening although one was asked for (its port is
        # taken, say); the rest of the pipeline serves without it. None when it listens or none
        # was configured.
        self.listener_down: str | None = None
        # With a stable time, the intake makes one result per study from these ledgers.
        self.studies = (
            StudyLedgers(state_dir / "studies")
            if settings.study_stable_seconds is not None
            else None
        )
        # Outcomes of spooled images and of `record`, by closed-set code (metric labels).
        self.stats: Counter[str] = Counter()
        self._readers: list[asyncio.Task[None]] = []
        self._work = asyncio.Event()
        self._closing = False

    # -- life cycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Return interrupted spool entries to the queue, then start delivering, listening and
        reading. Call on the event loop that serves requests.

        A listener that cannot open its port (taken by another process, not permitted) does not
        stop the rest: `listener_down` says why, logged as an error, and the HTTP intakes, the
        outbox and its delivery serve on."""
        recovered = self.spool.recover()
        if self.worker is not None:
            self.worker.start()
        if self.listener is not None:
            try:
                self.listener.start()
            except OSError as exc:
                where = f"{self.settings.dicom_host}:{self.settings.dicom_port}"
                self.listener_down = (
                    f"the DICOM C-STORE listener could not listen on {where} "
                    f"({type(exc).__name__}: {exc.strerror or exc}); set CXR_DICOM_PORT to a free "
                    "port, or leave it empty for no listener"
                )[:300]
                self.listener = None
                logger.error(
                    "dicom listener not started",
                    extra={"fields": {"reason": self.listener_down}},
                )
        readers = max(1, self.settings.decode_slots)
        self._readers = [asyncio.create_task(self._read_spool()) for _ in range(readers)]
        if self.studies is not None:
            self._readers.append(asyncio.create_task(self._make_due_studies()))
        logger.info(
            "dicom networking started",
            extra={
                "fields": {
                    "destinations": [d.name for d in self.destinations],
                    "dicom_listener": self.listener is not None,
                    "dicom_listener_down": self.listener_down,
                    "spool_pending": self.spool.pending_count(),
                    "spool_recovered": recovered,
                }
            },
        )

    def stop_listening(self, drain_s: float) -> None:
        """Take no new associations; let running ones finish for up to `drain_s` (blocking)."""
        if self.listener is not None:
            self.listener.stop(drain_s)

    async def aclose(self, drain_s: float = 5.0) -> None:
        """Stop the intakes and the readers (what is spooled stays for the next start) and the
        delivery worker (what is queued stays in the outbox)."""
        self._closing = True
        await asyncio.to_thread(self.stop_listening, drain_s)
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        if self.worker is not None:
            await asyncio.to_thread(self.worker.stop, 10.0)
        self.outbox.close()

    # -- intake ------------------------------------------------------------------------------------

    def gate(self, ds: Dataset) -> str | None:
        """The intakes' header gate: None for a frontal chest CR/DX, else a reason code.

        When results are made per study, every image of an SOP class the model reads (CR, DX)
        with a Study Instance UID is taken, laterals and other views included: the study's result
        names each image it set aside, and why, which it can do only for images it received."""
        if self.studies is not None:
            sop_class = str(ds.get("SOPClassUID", "") or "")
            study = str(ds.get("StudyInstanceUID", "") or "").strip()
            taken = sop_class in self.metadata.intended_use.sop_class_uids and bool(study)
            return None if taken else "not_intended_use"
        return (
            None
            if intended_use_refusal(ds, self.metadata.intended_use) is None
            else ("not_intended_use")
        )

    def spooled(self) -> None:
        """An intake put an instance on the spool: wake a reader (thread-safe)."""
        self._loop().call_soon_threadsafe(self._work.set)

    def _loop(self) -> asyncio.AbstractEventLoop:
        return self._readers[0].get_loop() if self._readers else asyncio.get_event_loop()

    async def _read_spool(self) -> None:
        while not self._closing:
            entry = await asyncio.to_thread(self.spool.claim)
            if entry is None:
                self._work.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._work.wait(), _IDLE_POLL_S)
                continue
            await self._classify_spooled(entry)

    async def _predict_spooled(self, data: bytes) -> Prediction:
        """Classify a spooled image through the prediction step; raises its `ServiceError`
        (unreadable, not intended use) but waits out `Overloaded`: HTTP clients come first, and
        the spool waits (it is on disk, and bounded)."""
        while True:
            try:
                with self.step.admit(1, len(data)):
                    return await self.step.predict(
                        data, explain=self.explains, explain_class=self.explain_class, timer=None
                    )
            except Overloaded as exc:
                await asyncio.sleep(exc.retry_after_s or 1)

    async def _classify_spooled(self, entry: SpoolEntry) -> None:
        data = await asyncio.to_thread(entry.read_data)
        source = str(entry.meta.get("source", "intake"))
        if self.studies is not None:
            await self._read_for_study(entry, data, source)
            return
        try:
            prediction = await self._predict_spooled(data)
        except ServiceError as exc:
            self.stats[f"{source}:refused:{exc.code}"] += 1
            logger.info(
                "spooled image refused",
                extra={"fields": {"intake": source, "code": exc.code}},
            )
            await asyncio.to_thread(self.spool.done, entry)
            return
        answer = self._shape(prediction, f"{source}-{int(time.time() * 1000)}")
        try:
            await self.record(data, answer, prediction)
        except Exception as exc:  # rendering a hostile header: no result, but the spool moves on
            self.stats[f"{source}:failed:{type(exc).__name__}"] += 1
            logger.warning(
                "result objects could not be built",
                extra={"fields": {"intake": source, "error": type(exc).__name__}},
            )
        else:
            self.stats[f"{source}:recorded"] += 1
        await asyncio.to_thread(self.spool.done, entry)

    # -- one verdict per study -----------------------------------------------------------------

    async def _read_for_study(self, entry: SpoolEntry, data: bytes, source: str) -> None:
        """Read one image of a study into its ledger (classified, or set aside with the reason);
        the study's result is made once it is quiet (`_make_due_studies`)."""
        assert self.studies is not None
        try:
            arrived_at = entry.path.stat().st_mtime
        except FileNotFoundError:
            arrived_at = time.time()
        try:
            header, digest = await asyncio.to_thread(_header_and_digest, data)
        except Exception as exc:  # a hostile header: no study to file it in
            self.stats[f"{source}:failed:{type(exc).__name__}"] += 1
            await asyncio.to_thread(self.spool.done, entry)
            return
        study_uid = str(header.get("StudyInstanceUID", "") or "").strip()
        sop_uid = str(header.get("SOPInstanceUID", "") or "").strip()
        try:
            known = await asyncio.to_thread(self.studies.reading, study_uid, sop_uid)
            if known is not None and known.digest == digest:
                reading = known  # a resend: read already
                self.stats[f"{source}:study:resent"] += 1
            else:
                reading = await self._study_reading(header, digest, sop_uid, data, source)
            await asyncio.to_thread(self.studies.add, study_uid, reading, arrived_at)
        except Exception as exc:  # a header that cannot be recorded: counted, the spool moves on
            self.stats[f"{source}:failed:{type(exc).__name__}"] += 1
            logger.warning(
                "study image could not be recorded",
                extra={"fields": {"intake": source, "error": type(exc).__name__}},
            )
        await asyncio.to_thread(self.spool.done, entry)

    async def _study_reading(
        self, header: Dataset, digest: str, sop_uid: str, data: bytes, source: str
    ) -> ImageReading:
        without_pixels = header.to_json_dict()
        refusal = intended_use_refusal(header, self.metadata.intended_use)
        if refusal is not None:
            self.stats[f"{source}:study:set_aside"] += 1
            return ImageReading(sop_uid, digest, without_pixels, set_aside=refusal)
        try:
            prediction = await self._predict_spooled(data)
        except ServiceError as exc:
            self.stats[f"{source}:study:set_aside"] += 1
            return ImageReading(
                sop_uid, digest, without_pixels, set_aside=f"not read: {exc.message}"
            )
        self.stats[f"{source}:study:read"] += 1
        answer = self._shape(prediction, f"{source}-{int(time.time() * 1000)}")
        return ImageReading(sop_uid, digest, without_pixels, answer=answer)

    async def _make_due_studies(self) -> None:
        """Make the result of every study that has gone quiet, for as long as the pipeline runs.
        A study whose result cannot be built (a hostile header) is counted and not tried again
        for that image set; one the outbox could not store (full, unreachable) is tried again
        after `_STUDY_RETRY_S`."""
        assert self.studies is not None and self.settings.study_stable_seconds is not None
        stable_s = self.settings.study_stable_seconds
        interval = min(max(stable_s / 4, 0.05), 1.0)
        retry_at: dict[str, float] = {}
        prune_at = 0.0
        while not self._closing:
            await asyncio.sleep(interval)
            oldest = await asyncio.to_thread(self.spool.oldest_arrival)
            due = await asyncio.to_thread(self.studies.due, stable_s, time.time(), oldest)
            now = time.monotonic()
            due = [uid for uid in due if retry_at.get(uid, 0.0) <= now]
            for study_uid in due:
                retry_at.pop(study_uid, None)
                try:
                    await asyncio.to_thread(self._record_study, study_uid)
                except StudyNotStored as exc:
                    cause = type(exc.__cause__).__name__
                    self.stats[f"study:deferred:{cause}"] += 1
                    logger.warning(
                        "study result not stored; trying again", extra={"fields": {"error": cause}}
                    )
                    retry_at[study_uid] = time.monotonic() + _STUDY_RETRY_S
                except Exception as exc:
                    self.stats[f"study:failed:{type(exc).__name__}"] += 1
                    logger.warning(
                        "study result could not be built",
                        extra={"fields": {"error": type(exc).__name__}},
                    )
                    ledger = await asyncio.to_thread(self.studies.get, study_uid)
                    if ledger is not None:
                        await asyncio.to_thread(
                            self.studies.mark_rendered, study_uid, ledger.images_digest
                        )
                if self.worker is not None:
                    self.worker.wake()
            if time.monotonic() >= prune_at:
                await asyncio.to_thread(
                    self.studies.prune, time.time() - self.settings.results_retention_s
                )
                prune_at = time.monotonic() + _STUDY_PRUNE_EVERY_S

    def _record_study(self, study_uid: str) -> str | None:
        """Render a quiet study's one result into the outbox; returns its result key, or None
        when no frontal image of it was read (no result: nothing to say about the study)."""
        assert self.studies is not None
        ledger = self.studies.get(study_uid)
        if ledger is None:
            return None
        digest = ledger.images_digest
        positive_class = self.metadata.decision.positive_class
        images: list[StudyImage] = []
        set_aside: list[SetAsideImage] = []
        for uid in sorted(ledger.images):
            reading = ledger.images[uid]
            if reading.answer is None:
                set_aside.append(SetAsideImage(uid, reading.set_aside or "not read"))
                continue
            facts = dataclasses.replace(
                ResultFacts.from_answer(reading.answer, positive_class), pixel_digest=reading.digest
            )
            images.append(StudyImage(reading.source(), facts))
        if not images:
            self.stats["study:no_frontal_image"] += 1
            self.studies.mark_rendered(study_uid, digest)
            return None
        decider = deciding_image(images)
        reading_sha = (self.metadata.sha256, decider.facts.site_profile_sha256)
        key = study_result_key(study_uid, *reading_sha, digest)
        objects = render_study_objects(images, set_aside, digest)
        answers = {
            image.sop_instance_uid: ledger.images[image.sop_instance_uid].answer or {}
            for image in images
        }
        objects += _presentation_states(lambda: render_study_gsps(images, answers, digest))
        decider_answer = ledger.images[decider.sop_instance_uid].answer or {}
        result_json = study_answer(study_uid, images, set_aside, decider_answer)
        warnings = [str(w) for w in result_json["warnings"]]
        messages = render_messages(
            decider.source, decider.facts, key, warnings, self.hl7_profile, self.fhir_profile
        )
        routes = {o.kind: self._pacs_names for o in objects} | self._ris_names
        names = [d.name for d in self.destinations]
        try:
            self.outbox.enqueue(key, objects + messages, names, result_json, routes=routes)
        except Exception as exc:
            raise StudyNotStored from exc
        self.studies.mark_rendered(study_uid, digest)
        self.stats["study:recorded"] += 1
        return key

    @property
    def explains(self) -> bool:
        """Whether answers that make result objects need their class activation map (the
        heat-map Secondary Capture is configured and the model has one)."""
        return self.settings.results_heatmap and self.step.classifier.explains

    @property
    def explain_class(self) -> str | None:
        """The class whose map the heat map shows: the positive class, for every answer (a
        NORMAL answer's heat map shows where the evidence for the finding was, not a map of
        NORMAL). None when no heat map is made."""
        return self.metadata.decision.positive_class if self.explains else None

    # -- results -----------------------------------------------------------------------------------

    async def record(
        self, data: bytes, answer: dict[str, Any], prediction: Prediction
    ) -> RecordedResult:
        """Render the answer's result objects and store them in the outbox for every destination;
        returns once they are on disk (off the event loop)."""
        recorded = await asyncio.to_thread(self._record, data, answer, prediction)
        if self.worker is not None:
            self.worker.wake()
        return recorded

    def _record(
        self, data: bytes, answer: dict[str, Any], prediction: Prediction
    ) -> RecordedResult:
        source = pydicom.dcmread(io.BytesIO(data))
        sop_uid = str(source.SOPInstanceUID)
        # Content decides the result: the pixel data joins its key and UIDs (app.pacs.uids).
        pixels = source.pop(0x7FE00010, None)
        digest = pixel_data_digest(bytes(pixels.value or b"") if pixels is not None else b"")
        del pixels
        facts = dataclasses.replace(
            ResultFacts.from_answer(answer, self.metadata.decision.positive_class),
            pixel_digest=digest,
        )
        answers = self.settings.results_heatmap_answers
        image = (
            heatmap_picture(
                data, self.metadata, self.settings.max_image_pixels, self.settings.min_image_side
            )
            if self.settings.results_heatmap and wants_heatmap(facts, answers)
            else None
        )
        spec = self.metadata.preprocessing
        objects = render_objects(
            source, facts, image, input_size=(spec.width, spec.height), heatmap_answers=answers
        )
        # the attention region as a presentation state over the source, beside the SR's outline
        objects += _presentation_states(lambda: render_gsps(source, facts, applied_window(answer)))
        key = result_key(sop_uid, self.metadata.sha256, facts.site_profile_sha256, digest)
        warnings = [str(w) for w in answer.get("warnings") or []]
        messages = render_messages(
            source, facts, key, warnings, self.hl7_profile, self.fhir_profile
        )
        routes = {o.kind: self._pacs_names for o in objects} | self._ris_names
        names = [d.name for d in self.destinations]
        self.outbox.enqueue(key, objects + messages, names, answer, routes=routes)
        stored = self.outbox.result(key)
        if stored is None:  # purged between the two transactions: nothing else can remove it
            raise RuntimeError("the recorded result is no longer in the outbox")
        kept = self.outbox.objects(key)
        return RecordedResult(key, sop_uid, kept, names, stored)

    def result(self, source_sop_instance_uid: str) -> StoredResult | None:
        """The stored answer and delivery states for a source image (by its SOP Instance UID) or
        for one of the result objects (by theirs). A source UID under which different images were
        read has one result per image: the one recorded last is given (each result object's own
        UID names its own)."""
        reading = (source_sop_instance_uid, self.metadata.sha256, self.site_profile_sha256)
        found = (
            self.outbox.latest_result(result_key_prefix(*reading))
            # results recorded before content joined the key
            or self.outbox.result(result_key(*reading))
            or self.outbox.result(source_sop_instance_uid)
        )
        if found is None and self.studies is not None:
            # an image of a study read on the intake path, or the study itself: the study's
            # result made last (from the largest image set seen so far)
            study = self.studies.study_of(source_sop_instance_uid) or source_sop_instance_uid
            found = self.outbox.latest_result(
                study_result_key_prefix(study, self.metadata.sha256, self.site_profile_sha256)
            )
        return found

    def payload(self, source_sop_instance_uid: str, kind: str) -> bytes | None:
        """The encoded result object of `kind` ("sr", "sc", "gsps") for a source image."""
        stored = self.result(source_sop_instance_uid)
        if stored is None:
            return None
        found = [o for o in self.outbox.objects(stored.result_key) if o.kind.startswith(kind)]
        return found[0].payload if found else None


def heatmap_picture(
    data: bytes, metadata: ModelMetadata, max_pixels: int, min_side: int
) -> np.ndarray:
    """The picture a heat map is drawn on: the DICOM source as the model's display pipeline
    renders it (Modality LUT, VOI LUT or window, MONOCHROME1 inversion: `app.imaging.dicom`, the
    rendering the model input is made from), at full resolution (no JPEG 2000 reduction), sized by
    `heatmap_base`."""
    policy = DicomPolicy(
        rendering=metadata.preprocessing.dicom,
        intended_use=metadata.intended_use,
        max_inflated_bytes=max_pixels * 2 + 16 * 1024 * 1024,
    )
    opened = open_dicom(data, max_pixels, min_side, policy)
    with opened.render(policy).image as rendered:
        grey = np.asarray(rendered.convert("L"))
    return heatmap_base(grey)


def _presentation_states(render: Callable[[], list[ResultObject]]) -> list[ResultObject]:
    """The GSPS objects of a result, or none when they cannot be built (a header they cannot
    describe): the SR, and the SC, are recorded and delivered all the same. Logged with the
    error's type only."""
    try:
        return render()
    except Exception as exc:
        logger.warning(
            "presentation state could not be built; the result goes without it",
            extra={"fields": {"error": type(exc).__name__}},
        )
        return []


def _header_and_digest(data: bytes) -> tuple[Dataset, str]:
    """A spooled instance's header (no pixels, read as the intakes read it) and the digest of its
    pixel data (`app.pacs.uids.pixel_data_digest`)."""
    header = read_instance_header(data)
    source = pydicom.dcmread(io.BytesIO(data))
    pixels = source.get(0x7FE00010)
    return header, pixel_data_digest(bytes(pixels.value or b"") if pixels is not None else b"")
