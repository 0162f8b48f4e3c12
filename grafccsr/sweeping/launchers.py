"""Where a trial's command runs: ``launcher:`` in the study file.

local     a subprocess of the sweep process (default)
torchrun  the same, the command being ``torchrun --standalone --nproc_per_node=N -m grafccsr.train``
submitit  one job per trial through submitit: SLURM (``sbatch``), or submitit's local executor
          (a process tree on this machine) where there is no SLURM

Every launcher reads the trial's result the same way (the run folder's ``metrics.json``, exit
code, stderr tail: :func:`grafccsr.sweeping.runner.classify`) and reports where it ran through
``on_start(info)``: ``launcher``, ``host``, ``pid`` / ``job_id``, ``ranks``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from grafccsr.services.local import pid_alive
from grafccsr.sweeping import runner
from grafccsr.sweeping.spec import Objective, SpecError, StudySpec, override_value

JOB_INFO = "job.json"
"""Written by a submitit job into the run folder: the node's host name, pid and job id."""
DEFAULT_TIME_LIMIT_MIN = 24 * 60
SLURM_POLL_S = 10.0
LOCAL_POLL_S = 0.25

OnStart = Callable[[Dict[str, Any]], None]


class LocalLauncher:
    """A subprocess per trial (``launcher: local`` and ``launcher: torchrun``)."""

    def __init__(self, spec: StudySpec) -> None:
        self.name = spec.launcher
        self.ranks = spec.nproc_per_node if spec.uses_torchrun else 1
        self.host = socket.gethostname()

    def run(self, cmd: Sequence[str], run_dir: Path, objectives: Sequence[Objective], *,
            timeout_s: Optional[float], stop_event: threading.Event, env_extra: Mapping[str, str],
            procs: Optional[set] = None, on_start: Optional[OnStart] = None, trial_number: int = 0) -> runner.Outcome:
        def started(proc: subprocess.Popen) -> None:
            if on_start is not None:
                on_start({"launcher": self.name, "host": self.host, "pid": proc.pid, "ranks": self.ranks})

        env = dict(os.environ, **env_extra)
        return runner.run_trial(cmd, run_dir, objectives, timeout_s=timeout_s, stop_event=stop_event, env=env,
                                procs=procs, on_start=started)


# --------------------------------------------------------------------------- submitit


def run_job(cmd: Sequence[str], run_dir: str, env_extra: Mapping[str, str], watch_pid: Optional[int] = None,
            tag_job: bool = False) -> int:
    """Runs inside the submitit job: the trial's command with stdout/stderr in the run folder;
    returns its exit code. ``watch_pid``: the sweep process (local executor only) — when it dies,
    the trial is stopped like on Ctrl-C instead of running on unobserved. ``tag_job``: add the
    job id as the MLflow tag ``job_id`` (known only here, after submission)."""
    folder = Path(run_dir)
    info: Dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        import submitit

        info["job_id"] = str(submitit.JobEnvironment().job_id)
    except Exception:  # noqa: BLE001 - not under submitit (called directly)
        pass
    (folder / JOB_INFO).write_text(json.dumps(info))
    cmd = list(cmd)
    if tag_job and info.get("job_id"):
        cmd.append(f"++tracking.tags.job_id={info['job_id']}")
    env = dict(os.environ, **env_extra)
    with open(folder / "stdout.log", "ab") as out, open(folder / "stderr.log", "ab") as err:
        proc = subprocess.Popen(runner.die_with_parent(cmd), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    done = threading.Event()

    def watch() -> None:
        while not done.wait(1.0):
            if watch_pid and not pid_alive(watch_pid):
                runner.signal_group(proc, signal.SIGTERM)
                return

    threading.Thread(target=watch, daemon=True).start()
    try:
        return proc.wait()
    except KeyboardInterrupt:  # job.cancel() on the local executor: SIGINT, the trainer checkpoints and stops
        runner.signal_group(proc, signal.SIGINT)
        try:
            return proc.wait(timeout=runner.INTERRUPT_GRACE_S)
        except subprocess.TimeoutExpired:
            runner.signal_group(proc, signal.SIGKILL)
            return proc.wait()
    finally:
        done.set()


class SubmititLauncher:
    """One submitit job per trial. The run folder must be visible to the driver (shared
    filesystem on SLURM): the driver reads ``metrics.json`` from it when the job ends."""

    name = "submitit"

    def __init__(self, spec: StudySpec, folder: Path, base_overrides: Sequence[str] = ()) -> None:
        try:
            import submitit
        except ImportError:
            raise SpecError("launcher: submitit needs the submitit package (pip install submitit)") from None
        sub = spec.submitit
        cluster = None if sub.cluster == "auto" else sub.cluster
        self.folder = Path(sub.folder).expanduser().resolve() if sub.folder else Path(folder)
        self.executor = submitit.AutoExecutor(folder=str(self.folder / "%j"), cluster=cluster)
        self.cluster = self.executor.cluster
        self.ranks = spec.nproc_per_node if spec.uses_torchrun else 1
        self.study_name = spec.study_name
        device = override_value([*spec.base_overrides, *base_overrides], "train.device") or "auto"
        gpus = sub.gpus_per_trial
        if gpus is None:
            gpus = self.ranks if device.startswith("cuda") else 0
        time_limit = sub.time_limit_min
        if time_limit is None:
            time_limit = (math.ceil(spec.timeout_per_trial_s / 60.0) + 5 if spec.timeout_per_trial_s
                          else DEFAULT_TIME_LIMIT_MIN)
        params: Dict[str, Any] = {"timeout_min": int(math.ceil(time_limit)), "nodes": 1, "tasks_per_node": 1,
                                  "name": f"sweep-{spec.study_name}"}
        if gpus:
            params["gpus_per_node"] = int(gpus)
        if sub.cpus_per_trial:
            params["cpus_per_task"] = int(sub.cpus_per_trial)
        if sub.mem_gb:
            params["mem_gb"] = int(math.ceil(sub.mem_gb))
        if sub.partition:
            params["slurm_partition"] = sub.partition
        if sub.slurm_additional_parameters:
            params["slurm_additional_parameters"] = dict(sub.slurm_additional_parameters)
        if sub.setup:
            params["slurm_setup"] = list(sub.setup)
        self.params = params
        self.executor.update_parameters(**params)
        self._submit_lock = threading.Lock()
        self.poll_s = LOCAL_POLL_S if self.cluster in ("local", "debug") else SLURM_POLL_S

    def run(self, cmd: Sequence[str], run_dir: Path, objectives: Sequence[Objective], *,
            timeout_s: Optional[float], stop_event: threading.Event, env_extra: Mapping[str, str],
            procs: Optional[set] = None, on_start: Optional[OnStart] = None, trial_number: int = 0,
            tag_job: bool = False) -> runner.Outcome:
        runner.prepare_run_dir(run_dir)
        watch_pid = os.getpid() if self.cluster == "local" else None
        start = time.monotonic()
        try:
            with self._submit_lock:  # one executor, per-trial job names
                self.executor.update_parameters(name=f"sweep-{self.study_name}-trial-{trial_number}")
                job = self.executor.submit(run_job, list(cmd), str(run_dir), dict(env_extra), watch_pid, tag_job)
        except Exception as err:  # noqa: BLE001 - sbatch refused the job (partition, limits, ...)
            return runner.Outcome("FAIL", reason="submit_failed", message=f"submitit could not submit the job: {err}",
                                  run_dir=run_dir, duration_s=time.monotonic() - start)
        info = {"launcher": self.name, "cluster": self.cluster, "job_id": str(job.job_id), "ranks": self.ranks}
        if on_start is not None:
            try:
                on_start(info)
            except Exception:  # noqa: BLE001
                pass
        stop_cause, signalled_at, running_since = None, None, None
        while not job.done():
            now = time.monotonic()
            if running_since is None and (run_dir / JOB_INFO).exists():
                running_since = now  # the per-trial timeout counts from the job's start, not its queueing
            if stop_cause is None:
                if stop_event.is_set():
                    stop_cause = "interrupted"
                elif timeout_s is not None and running_since is not None and now - running_since > timeout_s:
                    stop_cause = "timeout"
                if stop_cause is not None:
                    signalled_at = now
                    job.cancel(check=False)
            elif now - signalled_at > runner.INTERRUPT_GRACE_S + 30 and self.cluster in ("local", "debug"):
                break  # a local job that ignores cancel: give up on it
            time.sleep(self.poll_s)
        exit_code, failure = None, ""
        try:
            exit_code = int(job.result())
        except Exception as err:  # noqa: BLE001 - cancelled, node failure, time limit, ...
            failure = f"submitit job {job.job_id} ({job.state}): {str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}"
        seconds = time.monotonic() - start
        stderr = runner.tail(run_dir / "stderr.log")
        summary = runner.read_metrics(run_dir)
        if exit_code is None and stop_cause is None and summary is None:
            job_err = runner.tail(Path(job.paths.stderr)) if getattr(job, "paths", None) else ""
            return runner.Outcome("FAIL", reason="job_failed", message=failure, exit_code=None, duration_s=seconds,
                                  stderr_tail=(stderr + "\n" + job_err).strip(), run_dir=run_dir)
        outcome = runner.classify(exit_code if exit_code is not None else -1, stop_cause, summary, stderr, objectives)
        if exit_code is None and failure and outcome.state != "COMPLETE":
            outcome.message = f"{outcome.message}; {failure}"
        outcome.duration_s, outcome.run_dir = seconds, run_dir
        return outcome


def job_info(run_dir: Path) -> Dict[str, Any]:
    try:
        return json.loads((Path(run_dir) / JOB_INFO).read_text())
    except (OSError, ValueError):
        return {}


def cancel_job(job_id: str) -> bool:
    """Best effort ``scancel`` of a SLURM job whose sweep process died (its trial was retried)."""
    try:
        return subprocess.run(["scancel", str(job_id)], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def make_launcher(spec: StudySpec, runs_folder: Path, extra_overrides: Sequence[str] = ()):
    if spec.launcher == "submitit":
        return SubmititLauncher(spec, runs_folder / "submitit", extra_overrides)
    return LocalLauncher(spec)
