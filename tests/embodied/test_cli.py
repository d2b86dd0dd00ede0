from pathlib import Path

import pytest
from hydra import compose, initialize
from hydra.core.hydra_config import HydraConfig

from embodied.cli import output_dir


def test_output_dir_is_the_users_folder_when_given(tmp_path):
    assert output_dir(str(tmp_path / "mine"), "checkpoints") == tmp_path / "mine"


def test_output_dir_is_hydras_run_dir_with_the_subdir(tmp_path):
    with initialize(version_base="1.3", config_path=None):
        cfg = compose(overrides=[f"hydra.runtime.output_dir={tmp_path}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        assert output_dir(None) == Path(tmp_path)
        assert output_dir(None, "checkpoints") == Path(tmp_path) / "checkpoints"
    finally:
        HydraConfig.instance().cfg = None


def test_output_dir_outside_hydra_says_so():
    HydraConfig.instance().cfg = None
    with pytest.raises(ValueError, match="HydraConfig"):
        output_dir(None)
