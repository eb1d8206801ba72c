"""Fixtures of the API tests: one shared world of users and conversations per module."""

import pytest

from .state import world_prime, world_transaction


@pytest.fixture(scope="module")
def shared_world(django_db_setup, django_db_blocker):
    with world_transaction(django_db_blocker) as world:
        yield world


@pytest.fixture
def world(shared_world, db, redis_clean):
    """The module's world (see ``state.World``) with every member's counters loaded."""
    world_prime(shared_world)
    return shared_world


@pytest.fixture
def large(settings):
    """Groups of 5 members or more are large; they go back under 4."""
    settings.LARGE_GROUP_MIN_MEMBERS = 5
    settings.LARGE_GROUP_EXIT_MEMBERS = 3
    return settings
