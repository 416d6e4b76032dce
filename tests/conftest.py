"""Shared fixtures: fresh folders per test (the fake engine, or the diffusers engine on one tiny
random model built once per session)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.daemon import Folders  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from stages.tiny_model import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture
def folders(tmp_path: Path) -> Folders:
    """A daemon's folders, computing with the fake engine."""
    return Folders(tmp_path)


@pytest.fixture
def diffusers_folders(tmp_path: Path, tiny_model: Path) -> Folders:
    """A daemon's folders, computing with the diffusers engine on the tiny model."""
    return Folders(tmp_path, tiny_model)
