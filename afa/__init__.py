"""afa: weakly-supervised semantic segmentation with AFA (Ru et al., CVPR 2022)."""
from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"

# `${afa_root:}` in conf/ names files shipped in this repository (the tiny MiT's prior)
# wherever train.py is run from.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
OmegaConf.register_new_resolver("afa_root", lambda: str(PROJECT_ROOT), replace=True)
