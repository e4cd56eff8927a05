"""Entry point: compose the Hydra config, validate it, run the recipe ``algo.recipe``, return the sweep objective.

python train.py                                   # embedded default, offline, CPU
python train.py model=gpt2 generate.temperature=0.7
python train.py -m generate.temperature=0.5,0.7,1.0
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline.config import register_configs, validate
from pipeline.launch import quiet_hydra
from pipeline.runtime import recipe_class

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(raw: DictConfig) -> float:
    cfg = validate(raw)
    hc = HydraConfig.get()
    group = Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    recipe = recipe_class(cfg.algo.recipe)(cfg, Path(hc.runtime.output_dir), group=group)
    try:
        recipe.setup()
        return recipe.train()
    except KeyboardInterrupt as stop:
        print(
            f"[stopped] {stop or 'interrupted'}; resume with trainer.resume=auto hydra.run.dir={hc.runtime.output_dir}"
        )
        sys.exit(130)
    finally:
        recipe.cleanup()


if __name__ == "__main__":
    quiet_hydra()  # under torchrun, ranks > 0 write no Hydra run folder
    main()
