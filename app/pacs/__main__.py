"""Run a delivery worker over an outbox until SIGTERM or SIGINT.

    pneumonia-deliver --state-dir /var/lib/cxr --stow http://pacs/dicom-web
    pneumonia-deliver --outbox-url postgresql://... --dimse ORTHANC@pacs:4242
    pneumonia-deliver --state-dir /var/lib/cxr --hl7 mllp://ris:2575 --fhir https://fhir/r4

The worker may run inside the service or, as here, as a process of its own beside it: the outbox is
the only thing they share.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType

from app.pacs.delivery import DeliveryWorker, Destination, DimseDestination, StowRsDestination
from app.pacs.fhir import FhirDestination
from app.pacs.hl7 import MllpDestination
from app.pacs.outbox import Outbox
from app.pacs.pipeline import FHIR, HL7


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pneumonia-deliver", description=__doc__)
    parser.add_argument("--state-dir", type=Path, help="directory of the SQLite outbox")
    parser.add_argument("--outbox-url", help="postgresql:// URL of a shared outbox")
    parser.add_argument("--stow", action="append", default=[], help="DICOMweb base URL")
    parser.add_argument("--dimse", action="append", default=[], help="AET@host:port")
    parser.add_argument("--hl7", help="mllp://host:port of a RIS taking ORU^R01 (named hl7)")
    parser.add_argument(
        "--fhir",
        help="base URL of a FHIR R4 server (named fhir); its Authorization header, if any, is "
        "read from CXR_RESULTS_FHIR_AUTH in the environment (never from the command line)",
    )
    parser.add_argument("--calling-ae-title", default="PNEUMONIA_AI")
    parser.add_argument("--worker-id")
    parser.add_argument("--batch-size", type=int, default=16, help="objects per send")
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--max-backoff", type=float, default=30.0)
    parser.add_argument("--lease", type=float, default=120.0, help="claim lease, seconds")
    parser.add_argument("--give-up-after", type=float, default=7 * 24 * 3600.0)
    args = parser.parse_args(argv)
    if (args.state_dir is None) == (args.outbox_url is None):
        parser.error("give exactly one of --state-dir and --outbox-url")
    destinations: list[Destination] = [StowRsDestination(url) for url in args.stow]
    destinations += [
        DimseDestination.parse(spec, calling_ae_title=args.calling_ae_title) for spec in args.dimse
    ]
    # the names the service gives them, so that this worker settles the rows it queued
    if args.hl7:
        destinations.append(MllpDestination.parse(args.hl7, name=HL7))
    if args.fhir:
        token = os.environ.get("CXR_RESULTS_FHIR_AUTH") or None
        destinations.append(FhirDestination(args.fhir, name=FHIR, auth_header=token))
    if not destinations:
        parser.error("give at least one --stow, --dimse, --hl7 or --fhir destination")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    outbox = Outbox.open(
        args.state_dir, args.outbox_url, lease_s=args.lease, give_up_after_s=args.give_up_after
    )
    worker = DeliveryWorker(
        outbox,
        destinations,
        worker_id=args.worker_id,
        batch_size=args.batch_size,
        poll_interval_s=args.poll_interval,
        max_backoff_s=args.max_backoff,
    )
    stopping = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    worker.start()
    logging.getLogger("app.pacs").info(
        "pacs delivery worker started destinations=%s", ",".join(d.name for d in destinations)
    )
    stopping.wait()
    stopped = worker.stop(timeout_s=30.0)
    outbox.close()
    return 0 if stopped else 1


if __name__ == "__main__":
    raise SystemExit(main())
