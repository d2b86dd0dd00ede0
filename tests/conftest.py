import pytest

from envs.tabletop import TabletopEnv


@pytest.fixture
def env():
    e = TabletopEnv()
    try:
        yield e
    finally:
        e.close()
