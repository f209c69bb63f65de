"""distlocal entry point (Hydra).

    python launch/train.py model=convnet mode=local
    torchrun --nproc_per_node=2 launch/train.py mode=local
    deepspeed --num_gpus 2 launch/train.py engine=deepspeed   (DS_ACCELERATOR=cpu on CPU)
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from distlocal import cli
from distlocal.config import CONFIG_DIR, register_configs
from distlocal.errors import ConfigError


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> float:
    from distlocal.checkpoint import CheckpointError
    from distlocal.trainer import TrainingDiverged, train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = train(cfg, run_dir)
    except ConfigError as exc:
        cli.die(str(exc))
    except (TrainingDiverged, CheckpointError) as exc:  # stopped with its state saved: resume=auto
        # Raised by every rank at the same step (the failed write is broadcast, the divergence is
        # decided on averaged deltas): they leave together, so torchrun sees exit 3 from each.
        cli.die(str(exc), code=3, every_rank=True)
    return summary["final_test_acc"]  # the value a Hydra sweeper would optimise


if __name__ == "__main__":
    argv = cli.strip_local_rank(sys.argv[1:])
    cfg = cli.precheck(argv)
    register_configs()
    sys.argv = [sys.argv[0], *cli.agreed_run_dir(argv, cfg)]
    main()
    # Only reached when the run (or every job of a sweep) finished: errors exit inside main().
    # Every rank leaves the process group and then the process, together: see exit_together.
    from distlocal.parallel.env import exit_together

    exit_together(0)
