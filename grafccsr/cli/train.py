"""``python -m grafccsr.train [+exp=NAME] [key=value ...]``: one training run.

Hydra composes ``conf/`` onto the typed schema. Before Hydra creates a run folder, the
overrides are composed and validated here, so a bad config prints one line and exits 2 with
nothing left behind. ``resume=RUN_FOLDER`` continues a run from its own stored config (new
``key=value`` overrides on top) in the same folder and the same MLflow run.

Exit codes: 0 finished, 1 bug (traceback), 2 bad config (also: a run folder that cannot be
written, a tracking server that does not answer), 3 out of memory, 4 NaN/Inf loss, 5 unreadable
data, 6 a run file could not be written (disk full, file-size limit), 130 interrupted (a
checkpoint was written).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import sys
from contextlib import redirect_stderr
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import yaml

from grafccsr.cli.common import error, exit_code_for
from grafccsr.config import Config, ConfigError, apply_overrides, compose, register_configs, to_config
from grafccsr.config.schema import TrackingConfig
from grafccsr.paths import CONF_DIR
from grafccsr.tracking.files import unwritable
from grafccsr.tracking.store import apply_http_settings, is_server, resolve_uri
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
    home = None
    if resume.startswith("mlflow:"):  # the run folder is on another machine: its uploaded checkpoint
        run_id = resume[len("mlflow:"):]
        home = Path("runs") / "resumed" / run_id
        resume = str(_fetch_from_mlflow(run_id, overrides, home / "download"))
    ckpt = resolve_checkpoint(resume)
    stored = load_checkpoint(ckpt)["config"]
    started_with = _started_with(ckpt.parent)
    rest = [o for o in overrides if not o.lstrip("+").startswith("resume=") and o not in started_with]
    cfg = apply_overrides(stored, rest)
    cfg.resume = str(ckpt)
    home = home or ckpt.parent
    if not any(o.startswith("output_dir=") for o in rest):
        cfg.output_dir = str(home)
    return cfg, home


def _started_with(folder: Path) -> set:
    """The overrides a run folder's run was started with (Hydra's ``.hydra/overrides.yaml``):
    already in its stored config, so repeating the first command line with ``resume=`` (as a
    job restarted by torchrun does) applies only what changed."""
    try:
        listed = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return set()
    return {str(o) for o in listed} if isinstance(listed, list) else set()


def _fetch_from_mlflow(run_id: str, overrides: Sequence[str], dest: Path) -> Path:
    """``resume=mlflow:<run id>``: download the run's newest uploaded checkpoint (the run then
    continues in ``runs/resumed/<run id>/`` and in the same MLflow run)."""
    from grafccsr.tracking.mlflow import fetch_checkpoint  # imports mlflow
    from grafccsr.tracking.store import resolve_uri

    uris = [o.split("=", 1)[1] for o in overrides if o.startswith("tracking.uri=")]
    return fetch_checkpoint(run_id, resolve_uri(uris[-1] if uris else None), dest)


def check_start(cfg: Config, argv: Sequence[str]) -> None:
    """What the world must offer before anything starts: run folders that take files and a
    tracking server that answers (one request, ``tracking.request_timeout_s``, no retries), and
    the device the config asks for."""
    from grafccsr.training.build import resolve_device

    resolve_device(cfg.train.device)  # CUDA asked on a machine without it: before Hydra makes a folder
    explicit = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    folders = [Path(explicit[-1]) if explicit else Path("runs") / cfg.exp_name]
    if cfg.output_dir:
        folders.append(Path(cfg.output_dir))
    for folder in folders:
        why = unwritable(folder)
        if why:
            raise ConfigError(f"cannot write the run folder {folder} ({why}); choose another with "
                              "hydra.run.dir=DIR (or output_dir=DIR)")
    uri = resolve_uri(cfg.tracking.uri)
    if cfg.tracking.backend == "mlflow" and is_server(uri):
        from grafccsr.tracking.mlflow import check_server  # imports mlflow

        check_server(uri, cfg.tracking.request_timeout_s)


def run_name(cfg: Config, overrides: Sequence[str], folder: Path) -> str:
    """The preset, the overrides (shortened) and the run folder: unique across a multirun."""
    shown = " ".join(o for o in user_overrides(overrides)
                     if not o.startswith(("+exp=", "resume=", "tracking.", "output_dir=")))
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return " ".join(part for part in (cfg.exp_name, shown, folder.name) if part)


def _leave_nothing(folder: Path) -> None:
    """Remove a run folder that holds nothing but what Hydra wrote for a run that never started."""
    try:
        if folder.is_dir() and {p.name for p in folder.iterdir()} <= HYDRA_FILES:
            shutil.rmtree(folder)
            if folder.parent.parent.name == "runs":  # the default runs/<exp>/<time>: Hydra made the parents too
                for parent in (folder.parent, folder.parent.parent):
                    if not any(parent.iterdir()):
                        parent.rmdir()
    except OSError:
        pass


def task(dict_cfg) -> int:
    """The Hydra task: plan, train, report. A single run exits with its code; a multirun job
    returns it (the callback marks the parent run FAILED when one job failed)."""
    from hydra.core.hydra_config import HydraConfig

    from grafccsr.tracking import build_tracker
    from grafccsr.training.loop import train

    from hydra.types import RunMode

    from grafccsr.tracking.multirun import PARENT_ENV

    from grafccsr.training import distributed

    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    hydra_folder = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    rank = distributed.from_env()
    try:
        cfg, _ = plan_run(overrides, composed=dict_cfg)
        if os.environ.get(PARENT_ENV) and not cfg.tracking.parent_run_id:
            cfg.tracking.parent_run_id = os.environ[PARENT_ENV]
        output_dir = Path(cfg.output_dir or hydra_folder)
        note = "python -m grafccsr.train " + " ".join(overrides)
        result = train(cfg, output_dir, build_tracker, run_name=run_name(cfg, overrides, output_dir), note=note)
    except (Exception, KeyboardInterrupt) as err:
        code = exit_code_for(err, PROG) if rank.is_main else _quiet_code(err)
        if code is None:
            raise
        if rank.is_main:
            _leave_nothing(hydra_folder)
        if multirun:  # the other jobs of the multirun still run
            return code
        sys.exit(code)
    summary = result.summary
    if not rank.is_main:  # rank 0 reports
        if result.exit_code and not multirun:
            sys.exit(result.exit_code)
        return result.exit_code
    if not summary:  # stopped before the run was opened: nothing to keep
        _leave_nothing(hydra_folder)
    line = result.status + (f" ({result.reason}: {summary.get('message', '')})" if result.reason else "")
    lost = summary.get("tracking") or {}
    if lost.get("state") == "lost":
        line += f" - MLflow tracking lost at iteration {lost['lost_at_iteration']} ({lost['lost_cause']})"
    print(f"{line} - iteration {summary.get('iteration')} - run folder {output_dir}")
    if summary.get("mlflow_run_id"):
        print(f"MLflow run {summary['mlflow_run_id']}: {summary.get('mlflow_url') or summary.get('tracking_uri')}")
    if result.exit_code and not multirun:
        sys.exit(result.exit_code)
    return result.exit_code


def _quiet_code(err: BaseException) -> Optional[int]:
    """Ranks other than 0 exit with the same code as rank 0, without printing."""
    with redirect_stderr(io.StringIO()):
        return exit_code_for(err, PROG)


def torchrun_overrides(overrides: Sequence[str], cfg: Config, resumed: Optional[Path]) -> List[str]:
    """Under torchrun: every rank (and every restart) uses one run folder named after the
    job's rendezvous id; ranks other than 0 write no Hydra files and log only warnings; a
    restarted job resumes from that folder's checkpoint."""
    from grafccsr.training import distributed

    info = distributed.from_env()
    if not info.enabled:
        return []
    extra: List[str] = []
    if resumed is None:
        explicit = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")]
        if explicit:
            folder = Path(explicit[-1])
        else:
            job = os.environ.get("TORCHELASTIC_RUN_ID", "job")[:12]
            folder = Path("runs") / cfg.exp_name / f"torchrun-{job}"
            extra.append(f"hydra.run.dir={folder}")
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        if restarted and (folder / "checkpoint.pt").is_file():
            extra += [f"resume={folder}", "hydra.output_subdir=null"]
    if not info.is_main:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled"]
    return extra


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Validate before Hydra starts (so a bad config leaves no run folder), then run Hydra."""
    import hydra
    from hydra._internal.utils import get_args_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    args = get_args_parser().parse_args(argv)
    register_configs()
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "1")  # we print the link ourselves
    logging.raiseExceptions = False  # a full disk must not turn each line for train.log into a traceback
    defaults = TrackingConfig()  # bounded MLflow calls from the start (resume=mlflow:, a multirun's parent)
    apply_http_settings(defaults.request_timeout_s, defaults.request_retries)
    if not (args.help or args.hydra_help or args.shell_completion or args.info or args.multirun):
        try:
            cfg, resumed_folder = plan_run(args.overrides)
            if resumed_folder is not None:
                if (_resume_value(args.overrides) or "").startswith("mlflow:"):
                    # downloaded once, here: the task resumes from that copy, in the same folder
                    argv = [o for o in argv if not o.lstrip("+").startswith("resume=")]
                    argv += [f"resume={cfg.resume}", f"output_dir={resumed_folder}"]
                # continue in the run's own folder (train.log appended), keeping its .hydra/
                argv += [f"hydra.run.dir={resumed_folder}", "hydra.output_subdir=null"]
            argv += torchrun_overrides(args.overrides, cfg, resumed_folder)
            apply_http_settings(cfg.tracking.request_timeout_s, cfg.tracking.request_retries)
            check_start(cfg, argv)
        except ConfigError as err:
            from grafccsr.training import distributed

            sys.exit(error(str(err), EXIT_CONFIG, PROG) if distributed.from_env().is_main else EXIT_CONFIG)
    sys.argv = [sys.argv[0], *argv]
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(task)()


if __name__ == "__main__":
    main()
