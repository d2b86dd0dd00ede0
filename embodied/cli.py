"""What every ``embodied-*`` command does at the Hydra boundary, once."""

from __future__ import annotations

from pathlib import Path


def output_dir(out: str | None, subdir: str = "") -> Path:
    """The folder a command writes to: ``out`` when the user gave one, else ``subdir`` inside Hydra's run
    directory (``outputs/<date>/<time>/`` or the multirun job's folder). Call it from inside ``@hydra.main``."""
    if out is not None:
        return Path(out)
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    return run_dir / subdir if subdir else run_dir
