"""Fixtures of the interpret tests: the known-concept world, built once per session."""

from __future__ import annotations

import pytest

from tests.interpret.known_world import build_mask_world, build_world


@pytest.fixture(scope="session")
def world():
    return build_world()


@pytest.fixture(scope="session")
def mask_world(world):
    return build_mask_world(world)
