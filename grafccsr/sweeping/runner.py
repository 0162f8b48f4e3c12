"""One trial = one ``python -m grafccsr.train ...`` subprocess; its result is read back from
``<run folder>/metrics.json`` and classified (the driver talks to training only this way)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from grafccsr.config import ConfigError
from grafccsr.sweeping.spec import Objective, extract_metric
from grafccsr.tracking.summary import METRICS_FILE
from grafccsr.training.outcome import EXIT_CONFIG, REASON_BY_EXIT

EXIT_REASONS = {**REASON_BY_EXIT, -signal.SIGINT: "interrupted"}
QUALITY_METRICS = ("fid", "kid_mean", "kid_std", "fid_rf", "kid_rf_mean", "kid_rf_std")
# Hydra rejects unknown keys / bad override syntax with exit code 1 before the app runs.
_HYDRA_CONFIG_ERRORS = re.compile(
    r"Could not override|Key '.*' not in|ConfigCompositionException|OverrideParseException|"
    r"Could not load '|Error merging override|Could not append to config|mismatched input")
EXIT_LAUNCH = 127
"""The trainer command could not be started (as a shell says it)."""
INTERRUPT_GRACE_S = 30.0
STDERR_TAIL_CHARS = 4000


@dataclass
class Outcome:
    """What a trial produced, before it is told to Optuna."""

    state: str  # COMPLETE | FAIL | PRUNED
    values: Optional[List[float]] = None
    reason: Optional[str] = None  # oom, nonfinite, config, crash, error, timeout, interrupted, missing_metric, ...
    message: str = ""
    summary: Optional[Dict[str, Any]] = None
    exit_code: Optional[int] = None
    duration_s: float = 0.0
    stderr_tail: str = ""
    run_dir: Optional[Path] = None

    @property
    def mlflow_run_id(self) -> Optional[str]:
        return (self.summary or {}).get("mlflow_run_id")

    @property
    def peak_memory_mb(self) -> Optional[float]:
        return extract_metric(self.summary or {}, "peak_memory_mb")


def build_command(trainer_cmd: Sequence[str], overrides: Sequence[str]) -> List[str]:
    return [*trainer_cmd, *overrides]


def prepare_run_dir(run_dir: Path) -> None:
    """A fresh folder: a leftover from an earlier study of the same name is moved aside, never
    read as this trial's result."""
    if run_dir.exists():
        stale = run_dir.with_name(f"{run_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        run_dir.rename(stale)
    run_dir.mkdir(parents=True)


_DIE_WITH_PARENT = (
    "import ctypes, os, sys\n"
    "parent, sig = int(sys.argv[1]), int(sys.argv[2])\n"
    "try:\n    ctypes.CDLL(None).prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG\n"
    "except Exception:\n    pass\n"
    "if os.getppid() != parent:\n    os.kill(os.getpid(), sig)\n"
    "try:\n    os.execvp(sys.argv[3], sys.argv[3:])\n"
    "except OSError as err:\n"
    "    sys.stderr.write('could not start %r: %s\\n' % (sys.argv[3], err))\n    sys.exit(127)\n")


def die_with_parent(cmd: Sequence[str], sig: int = signal.SIGTERM) -> List[str]:
    """``cmd`` made to receive ``sig`` when the process (thread) that starts it dies — a sweep
    killed with SIGKILL takes its trainer along instead of leaving it running unobserved. SIGTERM:
    the trainer then stops like on Ctrl-C, and torchrun stops its ranks. Linux only (prctl); a tiny
    ``python -I -S -c`` that execs ``cmd`` (same pid), not a preexec_fn, which is unsafe in a
    threaded driver."""
    if not sys.platform.startswith("linux"):
        return list(cmd)
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), str(int(sig)), *cmd]


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError, AttributeError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def run_subprocess(cmd: Sequence[str], run_dir: Path, *, timeout_s: Optional[float] = None,
                   stop_event: Optional[threading.Event] = None, env: Optional[Mapping[str, str]] = None,
                   poll_s: float = 0.2, procs: Optional[set] = None,
                   on_start: Optional[Callable[[subprocess.Popen], None]] = None) -> tuple:
    """Run ``cmd`` with stdout/stderr in ``run_dir``; returns ``(exit_code, stop_cause, seconds)``.

    ``stop_cause`` is ``"timeout"`` or ``"interrupted"`` when the driver stopped the process:
    SIGINT to its process group first (the trainer then checkpoints and writes metrics.json),
    SIGKILL after a grace period.
    """
    start = time.monotonic()
    stop_cause = None
    signalled_at = None
    with open(run_dir / "stdout.log", "wb") as out, open(run_dir / "stderr.log", "wb") as err:
        proc = subprocess.Popen(die_with_parent(cmd), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                env=dict(env) if env is not None else None, start_new_session=True)
        if procs is not None:
            procs.add(proc)
        try:
            if on_start is not None:
                try:
                    on_start(proc)
                except Exception:  # recording where it runs must not lose the trial
                    pass
            while True:
                try:
                    rc = proc.wait(timeout=poll_s)
                    break
                except subprocess.TimeoutExpired:
                    pass
                now = time.monotonic()
                if stop_cause is None:
                    if stop_event is not None and stop_event.is_set():
                        stop_cause = "interrupted"
                    elif timeout_s is not None and now - start > timeout_s:
                        stop_cause = "timeout"
                    if stop_cause is not None:
                        signalled_at = now
                        signal_group(proc, signal.SIGINT)
                elif now - signalled_at > INTERRUPT_GRACE_S:
                    signal_group(proc, signal.SIGKILL)
                    signalled_at = float("inf")
        except BaseException:
            signal_group(proc, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            if procs is not None:
                procs.discard(proc)
    return rc, stop_cause, time.monotonic() - start


def tail(path: Path, chars: int = STDERR_TAIL_CHARS) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - chars))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def read_metrics(run_dir: Path) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads((run_dir / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _last_lines(text: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()
             and not ln.startswith("Set the environment variable HYDRA_FULL_ERROR")]
    return " | ".join(lines[-n:])


_ERROR_LINE = re.compile(r"^(?:config error:|[\w.-]+: error: )\s*(.*)$")
"""The trainer's one-line errors: ``grafccsr.train: error: ...`` (and the older ``config error: ...``)."""


def _error_line(stderr: str) -> Optional[str]:
    for line in reversed(stderr.splitlines()):
        match = _ERROR_LINE.match(line.strip())
        if match:
            return match.group(1).strip()
    return None


def _config_message(stderr: str) -> str:
    return _error_line(stderr) or _last_lines(stderr, 4)


def classify(exit_code: int, stop_cause: Optional[str], summary: Optional[Dict[str, Any]], stderr: str,
             objectives: Sequence[Objective]) -> Outcome:
    """Decide the trial's state from exit code, metrics.json and stderr. Values are only ever
    the run's own measured numbers: anything missing or non-finite makes the trial FAIL."""
    finished = summary is not None and summary.get("status") == "FINISHED" and exit_code == 0
    if stop_cause is not None and not finished:  # a run that finished before the stop keeps its result
        message = ("stopped by the sweep: per-trial timeout" if stop_cause == "timeout"
                   else "stopped by the sweep: interrupted")
        return Outcome("FAIL", reason=stop_cause, message=message, summary=summary, exit_code=exit_code,
                       stderr_tail=stderr)
    partial = None
    if summary is not None and summary.get("status") not in ("FINISHED", "FAILED", "KILLED"):
        partial, summary = summary, None  # a progress snapshot of a process that died
    if summary is None:
        if exit_code == EXIT_CONFIG or _HYDRA_CONFIG_ERRORS.search(stderr or ""):
            return Outcome("FAIL", reason="config", message=_config_message(stderr), exit_code=exit_code,
                           stderr_tail=stderr)
        if exit_code == EXIT_LAUNCH and "could not start" in (stderr or ""):
            return Outcome("FAIL", reason="launch", message=_last_lines(stderr, 1), exit_code=exit_code,
                           stderr_tail=stderr)
        if exit_code in EXIT_REASONS and exit_code != 1:
            reason = EXIT_REASONS[exit_code]
        else:
            reason = "crash"
        message = f"exit code {exit_code}, no final {METRICS_FILE}"
        last = (_error_line(stderr) if reason == "data" else None) or _last_lines(stderr)
        return Outcome("FAIL", reason=reason, message=f"{message}: {last}" if last else message,
                       summary=partial, exit_code=exit_code, stderr_tail=stderr)
    status = summary.get("status")
    if status != "FINISHED" or exit_code != 0:
        reason = summary.get("reason") or EXIT_REASONS.get(exit_code) or "error"
        message = str(summary.get("message") or "") or _last_lines(stderr) or f"status {status}, exit code {exit_code}"
        return Outcome("FAIL", reason=reason, message=message, summary=summary, exit_code=exit_code,
                       stderr_tail=stderr)
    values, missing = [], []
    for objective in objectives:
        value = objective.extract(summary)
        if value is None:
            missing.append(objective.metric)
        else:
            values.append(value)
    if missing:
        hint = _quality_hint(missing, summary)
        return Outcome("FAIL", reason="missing_metric",
                       message=f"metrics.json has no finite value for {', '.join(missing)}{hint}",
                       summary=summary, exit_code=exit_code, stderr_tail=stderr)
    assert all(math.isfinite(v) for v in values)
    return Outcome("COMPLETE", values=values, summary=summary, exit_code=exit_code, stderr_tail=stderr)


def _quality_hint(missing: Sequence[str], summary: Mapping[str, Any]) -> str:
    """Why a FID/KID objective found nothing: another extractor's keys, or no evaluation."""
    if not any(m in QUALITY_METRICS for m in missing):
        return ""
    present = [k for k in QUALITY_METRICS if k in (summary.get("eval") or {})]
    if present:
        return (f" (metrics.json has {', '.join(present)} from the {summary.get('fid_extractor')} extractor: "
                "name that metric as the objective, or change eval.extractor)")
    return " (is eval disabled, or did evaluation fail?)"


def run_trial(cmd: Sequence[str], run_dir: Path, objectives: Sequence[Objective], **kwargs) -> Outcome:
    prepare_run_dir(run_dir)
    try:
        exit_code, stop_cause, seconds = run_subprocess(cmd, run_dir, **kwargs)
    except OSError as err:  # the trainer command itself could not start: every trial would meet this
        return Outcome("FAIL", reason="launch", message=f"could not start {cmd[0]!r}: {err}", run_dir=run_dir)
    outcome = classify(exit_code, stop_cause, read_metrics(run_dir), tail(run_dir / "stderr.log"), objectives)
    outcome.duration_s = seconds
    outcome.run_dir = run_dir
    return outcome


def predicted_peak_mb(overrides: Sequence[str]) -> Optional[float]:
    """Pre-launch memory estimate for a trial's overrides, in MB (the fake-tensor estimator);
    None when the estimator cannot price the config (the trial then runs and is measured)."""
    from grafccsr.sizing.estimate import estimate_peak_mb

    try:
        value = float(estimate_peak_mb(list(overrides)))
    except ConfigError:
        return None
    return value if math.isfinite(value) else None
