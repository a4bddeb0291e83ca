"""Shared by the export tests."""

from __future__ import annotations

import pytest
from single_thread import one_thread


@pytest.fixture
def single_threaded():
    with one_thread():
        yield
