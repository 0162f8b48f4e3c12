"""Running the ablation: one training subprocess per row, from a frozen copy of the code, one
after another; then the report.

``python -m analysis.ablation [--preset cpu|gpu] [--iters N] [--experiment NAME]
[--tracking-uri URI] [--items 3,6,11] [--repeats N] [--dry-run] [overrides ...]``

Every run has the same seed, model, batch size and iteration budget, and CCSR as the
original's regulariser (so item 9 has a CCSR branch to act on). Runs go to one MLflow
experiment, tagged ``ablation_item``, ``ablation_batch`` (one id per invocation),
``ablation_preset`` and ``ablation_code`` (a fingerprint of the training code). Then
:func:`analysis.report.write_report` writes ``reports/<experiment>/report.md`` from them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from .items import ITEMS, PRESETS, Item, Preset, build_command, default_experiment, select_items
from ..report import write_report
from ..runs import PROJECT_ROOT, redact, resolve_tracking_uri
from grafccsr.training.outcome import REASON_BY_EXIT

Runner = Callable[..., int]
"""``runner(cmd, log_path, timeout_s, cwd=None) -> exit code``."""

#: Files of the project that a training run does not import (changes there do not matter).
NOT_TRAINING_CODE = ("grafccsr/sweeping/", "grafccsr/sweep.py", "grafccsr/sizing/", "grafccsr/bench.py",
                     "grafccsr/eval.py", "grafccsr/memory.py", "grafccsr/cli/memory.py", "__main__.py")


def _code_files(root: Path) -> List[Path]:
    files = [*root.glob("grafccsr/**/*.py"), *root.glob("conf/**/*.yaml")]
    return sorted(p for p in files if "__pycache__" not in p.parts
                  and not any(str(p.relative_to(root)).startswith(x) or str(p).endswith(x) for x in NOT_TRAINING_CODE))


def code_fingerprint(root: Path = PROJECT_ROOT) -> str:
    """A short hash of the training code and configs (``grafccsr/**/*.py`` and ``conf/**/*.yaml``,
    less :data:`NOT_TRAINING_CODE`).

    Every run is tagged with the fingerprint taken just before it starts, so that a batch whose
    code changed between runs (a working tree edited meanwhile) is caught by the table instead
    of turning a code change into an item's "effect"."""
    digest = hashlib.sha256()
    for path in _code_files(root):
        digest.update(str(path.relative_to(root)).encode())
        try:
            digest.update(path.read_bytes())
        except OSError:
            continue
    return digest.hexdigest()[:12]


def snapshot_code(dest: Path, root: Path = PROJECT_ROOT) -> Path:
    """A frozen copy of ``grafccsr/``, ``conf/`` and ``pyproject.toml`` in ``dest`` (with ``data`` linked to the
    project's data folder, so the embedded dataset and FID statistics caches are shared).

    The training subprocesses run with ``dest`` as their working directory, so ``python -m
    grafccsr.train`` imports the copy: edits to the working tree made while a long ablation
    runs cannot leak into half of its rows."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(root / "grafccsr", dest / "grafccsr", ignore=ignore)
    shutil.copytree(root / "conf", dest / "conf", ignore=ignore)
    shutil.copy2(root / "pyproject.toml", dest / "pyproject.toml")  # marks a checkout: its conf/ is the config tree
    (root / "data").mkdir(exist_ok=True)
    (dest / "data").symlink_to(root / "data", target_is_directory=True)
    return dest


def subprocess_runner(cmd: List[str], log_path: Path, timeout_s: int, cwd: Optional[Path] = None) -> int:
    """Run one training command (from ``cwd``, default the project root), its output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1", MPLBACKEND="Agg")
    with open(log_path, "w") as log:
        log.write(f"cd {cwd or PROJECT_ROOT}\n" + " ".join(cmd) + "\n\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd or PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.terminate()  # the loop checkpoints and ends its MLflow run as KILLED
            try:
                return proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait(timeout=60)
            raise


@dataclass
class AblationPlan:
    preset: Preset
    iters: int
    experiment: str
    uri: str
    batch: str
    runs_root: Path
    items: List[Item]
    repeats: int = 1
    extra: Sequence[str] = ()
    timeout_s: Optional[int] = None
    code_dir: Optional[Path] = None
    """Working directory of the runs (a :func:`snapshot_code` copy); None = the project root."""
    commands: List[tuple] = field(default_factory=list)
    """(item, command, run folder) of every run, in order; filled from the fields above."""

    def __post_init__(self) -> None:
        self.commands = []
        for item in self.items:
            if not item.runnable:
                continue
            for r in range(self.repeats):
                name = item.key.replace("+", "_") + (f"-r{r}" if self.repeats > 1 else "")
                run_dir = self.runs_root / self.batch / name
                self.commands.append((item, build_command(item, self.preset, self.iters, self.experiment, self.uri,
                                                          self.batch, run_dir, self.extra), run_dir))


def _say(text: str) -> None:
    print(text, flush=True)


def _outcome(code: int, log_path: Path) -> str:
    if code == 0:
        return "finished"
    reason = REASON_BY_EXIT.get(code)
    return f"exit code {code}{f' ({reason})' if reason else ''}, see {log_path}"


def run_plan(plan: AblationPlan, runner: Runner = subprocess_runner, say: Callable[[str], None] = _say) -> List[int]:
    """Run the plan's commands one after another (never concurrently: they are timed)."""
    codes = []
    total = len(plan.commands)
    fingerprints = set()
    for n, (item, cmd, run_dir) in enumerate(plan.commands, 1):
        t0 = time.time()
        fingerprint = code_fingerprint(plan.code_dir or PROJECT_ROOT)
        if fingerprints and fingerprint not in fingerprints:
            say(f"warning: the training code changed during the ablation (fingerprint {fingerprint}); "
                "the table will not compare runs made with different code")
        fingerprints.add(fingerprint)
        say(f"[{n}/{total}] {item.label:34s} ...")
        log_path = run_dir.with_suffix(".log")
        code = runner([*cmd, f"++tracking.tags.ablation_code={fingerprint}"], log_path,
                      plan.timeout_s or plan.preset.timeout_s, cwd=plan.code_dir)
        say(f"[{n}/{total}] {item.label:34s} {_outcome(code, log_path)} in {time.time() - t0:.0f} s")
        codes.append(code)
    return codes


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m analysis.ablation",
        description="Measure the memory guide's items one by one against a baseline (see analysis/ablation/). "
                    "Extra arguments are Hydra overrides applied to every run.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="cpu (default): smoke-sized, 16 runs, ~2 min on 2 cores; gpu: GRAF sizes, batch 8, "
                        "300 iterations, fp16 AMP (needs CUDA)")
    p.add_argument("--iters", type=int, default=None, help="training iterations per run (preset default)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default ablation-<preset>)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store: a SQLite URI or an http(s):// tracking server (default sqlite:///<project>/mlflow.db)")
    p.add_argument("--items", default=None,
                   help=f"comma-separated subset of {','.join(i.key for i in ITEMS if i.runnable)} "
                        "(the baseline always runs)")
    p.add_argument("--repeats", type=int, default=1, help="runs per item (the table takes medians)")
    p.add_argument("--timeout", type=int, default=None, help="seconds per run (preset default)")
    p.add_argument("--runs-root", default=None, help="run folders (default <project>/runs/ablation/<experiment>)")
    p.add_argument("--out", default="reports", help="report folder root (reports/<experiment>/)")
    p.add_argument("--no-report", action="store_true", help="only run; do not write the report")
    p.add_argument("--report-only", action="store_true", help="skip the runs; report the latest batch (or --batch)")
    p.add_argument("--batch", default=None, help="with --report-only: the ablation_batch tag to report")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument("--no-snapshot", action="store_true",
                   help="run the working tree's code instead of a copy taken at the start (edits made while "
                        "the ablation runs then reach later rows; the table refuses to compare those)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. train.batch_size=4")
    return p.parse_intermixed_args(argv)


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _run_all(plan: AblationPlan, runner: Runner, snapshot: bool) -> None:
    root = plan.runs_root / plan.batch
    if snapshot:
        plan.code_dir = snapshot_code(root / "code")
    code_dir = plan.code_dir or PROJECT_ROOT
    print(f"ablation '{plan.experiment}' batch {plan.batch}: {len(plan.commands)} runs, preset {plan.preset.name} "
          f"({plan.preset.description}), {plan.iters} iterations each; MLflow {redact(plan.uri)}; code {code_dir} "
          f"(fingerprint {code_fingerprint(code_dir)})", flush=True)
    t0 = time.time()
    previous = signal.signal(signal.SIGTERM, _interrupt)  # stop the current run cleanly, as Ctrl-C does
    try:
        run_plan(plan, runner)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"all runs done in {(time.time() - t0) / 60:.1f} min", flush=True)


def main(argv: Optional[Sequence[str]] = None, runner: Runner = subprocess_runner) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    experiment = args.experiment or default_experiment(args.preset)
    uri = resolve_tracking_uri(args.tracking_uri)
    batch = time.strftime("%Y%m%d-%H%M%S")
    runs_root = Path(args.runs_root) if args.runs_root else PROJECT_ROOT / "runs" / "ablation" / experiment
    plan = AblationPlan(preset, args.iters or preset.iters, experiment, uri, batch, runs_root,
                        select_items(args.items), max(1, args.repeats), list(args.overrides), args.timeout)
    if args.dry_run:
        for item, cmd, _ in plan.commands:
            print(f"# {item.label}\n" + " ".join(shlex.quote(c) for c in cmd))
        return 0
    if not args.report_only:
        _run_all(plan, runner, snapshot=not args.no_snapshot)
    if args.no_report:
        return 0
    write_report(experiment, uri=uri, out=Path(args.out), kind="ablation",
                 batch=args.batch if args.report_only else batch)
    return 0
