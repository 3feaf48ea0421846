"""The tiny-model traces shared by the thought-anchor tests (built once per session)."""

import pytest

from tests.analysis.anchors.reference import tiny_traces as build_tiny_traces


@pytest.fixture(scope="session")
def tiny_traces():
    return build_tiny_traces()
