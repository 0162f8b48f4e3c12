"""Training entry point: ``python -m grafccsr.train [+exp=NAME] [key=value ...]``.

Hydra composes ``conf/`` onto the typed schema; the config is validated before
any work starts. ``--help`` lists the config groups, ``--cfg job`` prints the
composed config. Exit codes: 0 finished, 1 error, 2 bad config, 3 out of
memory, 4 NaN/Inf loss, 130 interrupted (a checkpoint was written).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from grafccsr.config import CONF_DIR, ConfigError, register_configs, to_config

register_configs()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(dict_cfg: DictConfig) -> None:
    try:
        cfg = to_config(dict_cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    output_dir = Path(cfg.output_dir or HydraConfig.get().runtime.output_dir)

    from grafccsr.tracking import build_tracker
    from grafccsr.training.loop import train

    result = train(cfg, output_dir, tracker_factory=build_tracker)
    summary = result.summary
    line = f"{result.status}"
    if result.reason:
        line += f" ({result.reason}: {summary.get('message', '')})"
    print(f"{line} — iteration {summary.get('iteration')} — run folder {output_dir}")
    if summary.get("mlflow_run_id"):
        print(f"MLflow run {summary['mlflow_run_id']} in {summary.get('tracking_uri')}")
    if result.exit_code:
        sys.exit(result.exit_code)


if __name__ == "__main__":
    main()
