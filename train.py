"""Train AFA: `python train.py [experiment=afa_voc] [key=value ...]` (see README)."""
import hydra
from omegaconf import DictConfig

from afa.engine.cli import run_command
from afa.engine.trainer import train


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    summary = run_command(lambda: train(cfg))
    if cfg.method.name == "psa":
        stage = {name: summary.get(name, {}) for name in ("cam", "rw", "seg")}  # method.stage=X runs one
        print(f"PSA — CAM label mIoU (train) {_number(stage['cam'].get('cam_label_miou'))} | random-walk label mIoU "
              f"(train) {_number(stage['rw'].get('pseudo_label_miou'))} | segmentation mIoU (val) "
              f"{_number(stage['seg'].get('segmentation_miou'))}")
        if "checkpoint" in stage["seg"]:
            print(f"segmentation checkpoint: {stage['seg']['checkpoint']}")
        print(f"run directory: {summary['run_dir']}")
        return
    if "segmentation_miou" in summary:
        print(
            f"val mIoU — CAM {summary['cam_miou']:.3f} | propagated {summary['propagated_miou']:.3f} | "
            f"segmentation {summary['segmentation_miou']:.3f} (classification F1 {summary['cls_f1']:.3f})"
        )
    print(f"checkpoint: {summary['checkpoint']}\nlog: {summary['log_file']}\nrun directory: {summary['run_dir']}")


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
