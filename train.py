"""Train AFA: `python train.py [experiment=afa_voc] [key=value ...]` (see README)."""
import hydra
from omegaconf import DictConfig

from afa.engine.cli import run_command
from afa.engine.trainer import train


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    summary = run_command(lambda: train(cfg))
    if "segmentation_miou" in summary:
        print(
            f"val mIoU — CAM {summary['cam_miou']:.3f} | propagated {summary['propagated_miou']:.3f} | "
            f"segmentation {summary['segmentation_miou']:.3f} (classification F1 {summary['cls_f1']:.3f})"
        )
    print(f"checkpoint: {summary['checkpoint']}\nlog: {summary['log_file']}\nrun directory: {summary['run_dir']}")


if __name__ == "__main__":
    main()
