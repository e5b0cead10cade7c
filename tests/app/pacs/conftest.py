"""Fixtures for the PACS tests: source images and the real peers of `pacs_servers`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from app.pacs.outbox import Outbox
from tests.app.pacs.pacs_results import SOURCES, load_source
from tests.app.pacs.pacs_servers import Orthanc, orthanc_server, postgres_cluster


@pytest.fixture(params=SOURCES)
def source(request: pytest.FixtureRequest) -> Dataset:
    return load_source(str(request.param))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with postgres_cluster() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def outbox_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., Outbox]]:
    """Opens outboxes on one fresh store of the parametrised backend."""
    opened: list[Outbox] = []
    url: str | None = None
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
        import psycopg

        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(
                "DROP TABLE IF EXISTS pacs_deliveries, pacs_objects, pacs_results CASCADE"
            )

    def open_outbox(**options: float) -> Outbox:
        box = Outbox.open(None if url else tmp_path / "state", url, **options)
        opened.append(box)
        return box

    yield open_outbox
    for box in opened:
        box.close()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with orthanc_server(tmp_path_factory.mktemp("orthanc")) as server:
        yield server
