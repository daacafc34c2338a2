"""Shared paths for the densepred Python tests.

The configs name their data relative to the repository root (``assets/...``), so every test runs
with the repository root as its working directory. The golden fixtures live in ``../shared``
beside the checkout (see ``../shared/fixtures/*/README.md``).
"""

from pathlib import Path

import os

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures"

# Module-scoped fixtures build models before any function-scoped fixture runs.
os.chdir(ROOT)


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)
