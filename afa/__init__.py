"""afa: weakly-supervised semantic segmentation with AFA (Ru et al., CVPR 2022)."""

__version__ = "0.1.0"
