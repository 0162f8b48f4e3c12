"""``python -m grafccsr.train [+exp=NAME] [key=value ...]``: one training run.

Hydra composes ``conf/`` onto the typed schema. Before Hydra creates a run folder, the
overrides are composed and validated here, so a bad config prints one line and exits 2 with
nothing left behind. ``resume=RUN_FOLDER`` continues a run from its own stored config (new
``key=value`` overrides on top) in the same folder and the same MLflow run.

Exit codes: 0 finished, 1 bug (traceback), 2 bad config, 3 out of memory, 4 NaN/Inf loss,
5 unreadable data, 130 interrupted (a checkpoint was written).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from grafccsr.cli.common import error, exit_code_for
from grafccsr.config import Config, ConfigError, apply_overrides, compose, register_configs, to_config
from grafccsr.paths import CONF_DIR
from grafccsr.training.outcome import EXIT_CONFIG

PROG = "grafccsr.train"
HYDRA_FILES = {".hydra", "train.log"}
"""What Hydra writes into a run folder before the run starts."""
log = logging.getLogger("grafccsr.train")


def user_overrides(overrides: Sequence[str]) -> List[str]:
    """The overrides that change the config (Hydra's own ``hydra.*`` settings left out)."""
    return [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]


def _resume_value(overrides: Sequence[str]) -> Optional[str]:
    for o in overrides:
        if o.lstrip("+").startswith("resume="):
            return o.split("=", 1)[1] or None
    return None


def plan_run(overrides: Sequence[str], composed=None) -> Tuple[Config, Optional[Path]]:
    """The validated config of a run and, when resuming, the run folder it continues.

    A fresh run is ``conf/`` with ``overrides``. ``resume=PATH`` (a run folder or a checkpoint)
    starts from the config stored in that checkpoint with the other overrides on top; an
    override that changes the models' shapes is refused when the checkpoint loads.
    """
    from grafccsr.training.checkpoint import load_checkpoint, resolve_checkpoint

    overrides = user_overrides(overrides)
    resume = _resume_value(overrides)
    if resume is None:
        return to_config(composed if composed is not None else compose(overrides)), None
    ckpt = resolve_checkpoint(resume)
    stored = load_checkpoint(ckpt)["config"]
    rest = [o for o in overrides if not o.lstrip("+").startswith("resume=")]
    cfg = apply_overrides(stored, rest)
    cfg.resume = str(ckpt)
    if not any(o.startswith("output_dir=") for o in rest):
        cfg.output_dir = str(ckpt.parent)
    return cfg, ckpt.parent


def run_name(cfg: Config, overrides: Sequence[str], folder: Path) -> str:
    """The preset, the overrides (shortened) and the run folder: unique across a multirun."""
    shown = " ".join(o for o in user_overrides(overrides) if not o.startswith(("+exp=", "resume=")))
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return " ".join(part for part in (cfg.exp_name, shown, folder.name) if part)


def _leave_nothing(folder: Path) -> None:
    """Remove a run folder that holds nothing but what Hydra wrote for a run that never started."""
    try:
        if folder.is_dir() and {p.name for p in folder.iterdir()} <= HYDRA_FILES:
            shutil.rmtree(folder)
    except OSError:
        pass


def task(dict_cfg) -> None:
    """The Hydra task: plan, train, report; exits with the run's code."""
    from hydra.core.hydra_config import HydraConfig

    from grafccsr.tracking import build_tracker
    from grafccsr.training.loop import train

    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    hydra_folder = Path(hydra_cfg.runtime.output_dir)
    try:
        cfg, _ = plan_run(overrides, composed=dict_cfg)
        output_dir = Path(cfg.output_dir or hydra_folder)
        note = "python -m grafccsr.train " + " ".join(overrides)
        result = train(cfg, output_dir, build_tracker, run_name=run_name(cfg, overrides, output_dir), note=note)
    except (Exception, KeyboardInterrupt) as err:
        code = exit_code_for(err, PROG)
        if code is None:
            raise
        _leave_nothing(hydra_folder)
        sys.exit(code)
    summary = result.summary
    line = result.status + (f" ({result.reason}: {summary.get('message', '')})" if result.reason else "")
    print(f"{line} - iteration {summary.get('iteration')} - run folder {output_dir}")
    if summary.get("mlflow_run_id"):
        print(f"MLflow run {summary['mlflow_run_id']}: {summary.get('mlflow_url') or summary.get('tracking_uri')}")
    if result.exit_code:
        sys.exit(result.exit_code)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Validate before Hydra starts (so a bad config leaves no run folder), then run Hydra."""
    import hydra
    from hydra._internal.utils import get_args_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    args = get_args_parser().parse_args(argv)
    register_configs()
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "1")  # we print the link ourselves
    if not (args.help or args.hydra_help or args.shell_completion or args.info or args.multirun):
        try:
            _, resumed_folder = plan_run(args.overrides)
        except ConfigError as err:
            sys.exit(error(str(err), EXIT_CONFIG, PROG))
        if resumed_folder is not None:
            # continue in the run's own folder (train.log appended), keeping its .hydra/
            argv += [f"hydra.run.dir={resumed_folder}", "hydra.output_subdir=null"]
    sys.argv = [sys.argv[0], *argv]
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(task)()


if __name__ == "__main__":
    main()
