"""Test tiers as markers, set from what each test uses (so no test can forget its own): `process`
for tests that start the service as a real process, `browser` for those that drive Chromium,
`realdata` for those that need the real X-rays. `slow` is set by hand on the training tests."""

from __future__ import annotations

import pytest

from tests.support.realdata import DATA_MISSING


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and (
            hasattr(module, "UvicornProcess") or hasattr(module, "uvicorn_serving_tiny_model")
        ):
            item.add_marker(pytest.mark.process)
        fixtures = getattr(item, "fixturenames", ())
        if "browser" in fixtures or (module is not None and hasattr(module, "open_offline")):
            item.add_marker(pytest.mark.browser)
        if any(m.kwargs.get("reason") == DATA_MISSING for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.realdata)
