"""Evaluate a checkpoint: `python eval.py ckpt=PATH [eval=ss|ms|ms_crf] [key=value ...]` (see README)."""
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from afa.engine.cli import run_command, stored_group_overrides
from afa.engine.evaluate import evaluate, print_results


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    choices = HydraConfig.get().runtime.choices
    results = run_command(lambda: evaluate(cfg, {group: choices.get(group) for group in ("model", "dataset", "method")}))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank returns the same results
        print_results(results, cfg)


if __name__ == "__main__":
    sys.argv = stored_group_overrides(sys.argv)
    main()
