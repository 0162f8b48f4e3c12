"""The sweep driver: Optuna ask/tell around training subprocesses.

Trial policy (see sweeps/README.md):

* COMPLETE — the run finished and every objective is a finite number from its metrics.json.
  With ``memory_budget_mb`` every COMPLETE trial carries the constraint
  ``memory_budget_mb = peak_memory_mb - budget`` (Trial.set_constraint): > 0 is infeasible,
  kept out of the Pareto front, and steers TPE/NSGA-II away.
* FAIL — no honest objective values exist (OOM, NaN/Inf loss, config error, crash, timeout,
  evaluation missing, interrupted). Nothing is fabricated; ``failure_reason`` and ``message``
  are user attributes and tags on the MLflow child run.
* FAIL that stops the sweep — a failure every trial would meet: a config error (exit 2) or a
  data error (exit 5) whose message names none of the searched keys (the machine, e.g. no
  CUDA; the data; the fixed overrides), or a trainer command that cannot start. The trial gets
  ``stopped_sweep`` (it does not count toward ``n_trials`` and its parameters are queued
  again), running trials are stopped like on Ctrl-C, and the sweep ends with one line (exit 2
  or 5): the budget is untouched for the run that follows the fix.
* PRUNED — never launched because the memory estimator predicts a peak over the budget; the
  constraint holds the (real) predicted excess, so samplers treat the trial as infeasible.

``n_trials`` is the study's total: trials interrupted by the sweep, trials that stopped it,
and trials of a sweep process that died (found through RDB heartbeats) do not count and are
queued again.

A study keeps the fixed overrides it ran with (the study file's ``base_overrides`` and the
command line's, user attribute ``fixed_overrides``): a later run with other ones is refused
(its trials would mix budgets in one Pareto front) unless ``new_study`` sends it to a study of
its own, ``<name>-<digest of the overrides>``.

Several sweep processes (machines) may share one study: "count, then ask" runs under a
cross-process lock (:class:`~grafccsr.sweeping.storage.StudyLock`), so the total is exact and
trial numbers are never reused. Each claimed trial gets a heartbeat thread (Optuna records
heartbeats by itself only inside ``study.optimize``); a trial whose process stopped beating for
``grace_period_s`` is failed by another process's ``fail_stale_trials``, queued again once, and
its MLflow run closed as FAILED (``worker_lost``). A process that has nothing left to launch
waits while other processes' trials run, so that a dead one is still noticed and re-run.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from grafccsr.paths import PROJECT_ROOT
from grafccsr.sweeping import launchers, runner
from grafccsr.sweeping.pareto import format_table, pareto_trials
from grafccsr.sweeping.spec import (CPU_STUDY, SpecError, StudySpec, derived_study_name, extract_metric,
                                    format_override, override_difference, override_value, short_names,
                                    trial_overrides)
from grafccsr.sweeping.storage import (StorageUnavailable, StudyLock, cpu_threads_per_worker, is_storage_error,
                                       make_storage, redact, resolve_storage_url, storage_cause)
from grafccsr.sweeping.tracking import SweepTracker, resolve_tracking_uri
from grafccsr.training.outcome import EXIT_CONFIG, EXIT_DATA, EXIT_STORAGE_LOST

RETRIED_REASONS = frozenset({"interrupted"})
STOPPING_REASONS = {"config": EXIT_CONFIG, "data": EXIT_DATA, "launch": EXIT_CONFIG}
"""Failures that every trial meets unless the trial's own parameters caused them: the reason
and the sweep's exit code."""
KEY_ERRORS = re.compile(r"is not a config key|Could not override|Key '[^']*' (?:is )?not in|Could not append to "
                        r"config|Could not delete from config")
"""Config errors about a key itself (a searched key the config does not have fails every value)."""
STOPPED_ATTR = "stopped_sweep"
FIXED_ATTR = "fixed_overrides"
STALE_RETRIES = 1  # a trial of a dead sweep process is queued again once
# Carried over to the retry of a stale trial; run-specific attributes (run_dir, pid, job_id...) are not.
KEPT_ON_RETRY = ("enqueued", "retry_of")
# Same overrides, same seed -> same result: a sampler proposing these again is not relaunched.
DETERMINISTIC_FAILURES = frozenset({"oom", "config", "nonfinite", "repeat_of_failed"})
DEFAULT = object()


def trial_seed(seed: int, n: int) -> int:
    """Decorrelated per-ask seed (numpy's MT19937 gives near-identical first draws for nearby
    small seeds such as 0 and 3)."""
    return int(np.random.SeedSequence([int(seed), int(n)]).generate_state(1)[0])


def counts_toward_total(trial) -> bool:
    """Does this trial use up one of the study's ``n_trials``?"""
    from optuna.trial import TrialState

    if trial.state == TrialState.WAITING:
        return False
    if trial.state == TrialState.FAIL:
        reason = trial.user_attrs.get("failure_reason")
        # No reason: failed by Optuna's stale-heartbeat check (its sweep process died).
        return reason is not None and reason not in RETRIED_REASONS and not trial.user_attrs.get(STOPPED_ATTR)
    return True


def fixed_overrides_of(trials) -> Optional[List[str]]:
    """The fixed overrides a study's counted trials ran with (their ``overrides`` attribute less
    the trial's own parameters, which come last), for studies recorded before ``fixed_overrides``."""
    for t in reversed(trials):
        overrides = t.user_attrs.get("overrides")
        if overrides and counts_toward_total(t):
            return list(overrides[:len(overrides) - len(t.params)])
    return None


class HeartbeatThread:
    """Records a trial's heartbeat every ``interval_s`` from claim to tell (also while the
    estimator runs, while a submitit job waits in a queue, and while the result is recorded)."""

    def __init__(self, storage, trial_id: int, interval_s: float) -> None:
        self._storage, self._trial_id, self._interval = storage, trial_id, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{trial_id}", daemon=True)

    def start(self) -> "HeartbeatThread":
        self._storage.record_heartbeat(self._trial_id)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._storage.record_heartbeat(self._trial_id)
            except Exception:  # noqa: BLE001 - a missed beat must not kill the trial
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)


@dataclass
class SweepResult:
    study_name: str
    storage_url: str
    parent_run_id: Optional[str]
    pareto: List[Any]
    launched: List[int] = field(default_factory=list)
    interrupted: bool = False
    study: Any = None
    storage_lost: Optional[str] = None
    """Why the sweep stopped early: its storage stopped answering (exit 7)."""
    stopped: Optional[str] = None
    """Why the sweep stopped after a trial: a failure every trial would meet (exit 2 or 5)."""
    stopped_code: int = 0


class Sweep:
    def __init__(self, spec: StudySpec, *, storage: Optional[str] = None, n_trials: Optional[int] = None,
                 workers: int = 1, tracking_uri: Any = DEFAULT, runs_root: Optional[Path] = None,
                 extra_overrides: Sequence[str] = (), trainer_cmd: Optional[Sequence[str]] = None,
                 predict: Optional[Callable[[Sequence[str]], Optional[float]]] = None,
                 out: Callable[[str], None] = None, new_study: bool = False) -> None:
        if workers < 1:
            raise SpecError("--workers must be >= 1")
        self.spec = spec
        self.storage_url = resolve_storage_url(storage or spec.storage)
        self.n_trials = spec.n_trials if n_trials is None else int(n_trials)
        self.workers = workers
        self.runs_root = Path(runs_root) if runs_root else PROJECT_ROOT / "runs"
        self.extra_overrides = list(extra_overrides)
        self.fixed_overrides = [*spec.base_overrides, *self.extra_overrides]
        self.new_study = new_study
        self.custom_trainer = bool(trainer_cmd or spec.trainer_cmd)
        self.trainer_cmd = spec.command(trainer_cmd)
        self.launcher = launchers.make_launcher(spec, self.runs_root / "sweeps" / spec.study_name,
                                                self.extra_overrides)
        self.predict = predict or runner.predicted_peak_mb
        self._out = out or (lambda line: print(line, flush=True))
        self._print_lock = threading.Lock()
        self.lock = StudyLock(self.storage_url, spec.study_name)
        self.stop_event = threading.Event()
        self.tracking_uri = resolve_tracking_uri(None if tracking_uri is DEFAULT else (tracking_uri or "none"))
        self.tracker = None
        self.study = None
        self.launched: List[int] = []
        self._heartbeat = False
        self._names = short_names(list(spec.search_space))
        self._procs: set = set()  # live trainer processes (killed on a second Ctrl-C)
        self._active: Dict[int, Any] = {}  # trial number -> (trial, params) while running
        self._owned: set = set()  # trial numbers claimed here and not yet told (_active ends earlier)
        self._closed: set = set()  # trial numbers already told
        self._state_lock = threading.Lock()
        self._running_workers = 0
        self._cuda_available: Optional[bool] = None
        self._predict_lock = threading.Lock()
        self._heartbeats: Dict[int, HeartbeatThread] = {}
        self._announced_wait = False
        self._lost: List[tuple] = []  # (trial, message) failed by _on_stale, told after the lock
        self.storage_lost: Optional[str] = None
        self._unrecorded: List[int] = []  # trials that ran but whose result the lost storage never took
        self.stopped: Optional[tuple] = None  # (exit code, message) of a failure every trial would meet
        self._moved_to: Optional[str] = None

    # -------------------------------------------------------------- output
    def say(self, line: str) -> None:
        with self._print_lock:
            self._out(line)

    def _params_text(self, params: Dict[str, Any]) -> str:
        return " ".join(f"{self._names.get(k, k)}={v}" for k, v in params.items())

    # -------------------------------------------------------------- set-up
    def _make_sampler(self, seed: int):
        import optuna

        spec, opts = self.spec, dict(self.spec.sampler_options)
        if spec.sampler == "tpe":
            opts.setdefault("constant_liar", True)
            return optuna.samplers.TPESampler(seed=seed, **opts)
        if spec.sampler == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, **opts)
        if spec.sampler == "grid":
            # BruteForceSampler, not GridSampler: it reads the visited points (enqueued ones
            # included) from the storage, so no combination runs twice; GridSampler maps trial
            # numbers to grid ids and repeats enqueued points.
            return optuna.samplers.BruteForceSampler(seed=seed, **opts)
        return optuna.samplers.RandomSampler(seed=seed, **opts)

    def _open_study(self):
        import optuna
        from optuna.storages._heartbeat import is_heartbeat_enabled

        spec = self.spec
        storage = make_storage(self.storage_url, spec.heartbeat_interval_s, spec.grace_period_s,
                               stale_callback=self._on_stale)
        study = optuna.create_study(storage=storage, study_name=spec.study_name, sampler=self._make_sampler(spec.seed),
                                    directions=spec.directions, load_if_exists=True)
        have = [d.name.lower() for d in study.directions]
        if have != spec.directions:
            raise SpecError(f"study {spec.study_name!r} in {redact(self.storage_url)} has directions {have}, "
                            f"the study file asks for {spec.directions}; use another study_name")
        if study.metric_names is None:
            study.set_metric_names(spec.metric_names)
        elif list(study.metric_names) != spec.metric_names:
            raise SpecError(f"study {spec.study_name!r} optimises {study.metric_names}, the study file asks for "
                            f"{spec.metric_names}; use another study_name")
        self._moved_to = self._check_fixed_overrides(study)
        if self._moved_to is not None:
            return study
        space = spec.search_space_json()
        if "search_space" not in study.user_attrs:
            study.set_user_attr("search_space", space)
            study.set_user_attr("sampler", spec.sampler)
            study.set_user_attr("base_overrides", spec.base_overrides)
            study.set_user_attr("memory_budget_mb", spec.memory_budget_mb)
        elif study.user_attrs["search_space"] != space:
            self.say(f"warning: the search space differs from the one study {spec.study_name!r} started with")
        for params in spec.enqueue:
            study.enqueue_trial(params, user_attrs={"enqueued": True}, skip_if_exists=True)
        self._heartbeat = is_heartbeat_enabled(study._storage)
        return study

    def _check_fixed_overrides(self, study) -> Optional[str]:
        """Record the fixed overrides on a study without counted trials. A study with trials
        keeps its own: others are refused (one line naming the difference) or, with
        ``new_study``, the name of the study they go to is returned."""
        trials = study.get_trials(deepcopy=False)
        recorded = study.user_attrs.get(FIXED_ATTR)
        if recorded is None:  # a study from before the attribute: what its trials ran with
            recorded = fixed_overrides_of(trials)
        counted = sum(counts_toward_total(t) for t in trials)
        difference = override_difference(recorded, self.fixed_overrides) if recorded is not None else ""
        if counted == 0 or not difference:
            if study.user_attrs.get(FIXED_ATTR) != self.fixed_overrides:
                study.set_user_attr(FIXED_ATTR, self.fixed_overrides)
            return None
        other = derived_study_name(self.spec.study_name, self.fixed_overrides)
        if self.new_study:
            self.say(f"study {self.spec.study_name!r} ran with other fixed overrides ({difference}); "
                     f"--new-study: these trials go to study {other!r}")
            return other
        raise SpecError(f"study {self.spec.study_name!r} has {counted} trial(s) run with other fixed overrides "
                        f"(study -> this command: {difference}); their results would mix in one Pareto front: "
                        f"add --new-study to run these as study {other!r}, or name one with --study-name")

    def _move_to(self, name: str) -> None:
        """Run as study ``name`` (``new_study``): its own lock, run folders and MLflow parent."""
        self.lock.close()
        self.spec.study_name = name
        self.lock = StudyLock(self.storage_url, name)
        self.new_study = False  # the derived study keeps its own overrides
        self.launcher = launchers.make_launcher(self.spec, self.runs_root / "sweeps" / name, self.extra_overrides)

    def _has_cuda(self) -> bool:
        if self._cuda_available is None:
            try:
                import torch

                self._cuda_available = bool(torch.cuda.is_available())
            except Exception:  # noqa: BLE001
                self._cuda_available = False
        return self._cuda_available

    def _check_machine(self) -> None:
        """A study whose fixed overrides train on CUDA cannot run a trial on a machine without
        it: refused before the study, its MLflow parent or a trial exist. Trials that run
        elsewhere (SLURM jobs, a custom trainer command) are not judged from here."""
        device = override_value(self.fixed_overrides, "train.device") or "auto"
        elsewhere = self.custom_trainer or getattr(self.launcher, "cluster", "local") not in ("local", "debug")
        if elsewhere or not device.startswith("cuda") or self._has_cuda():
            return
        raise SpecError(f"study {self.spec.study_name!r} trains with train.device={device} but this machine has no "
                        f"CUDA: run it on a GPU machine, choose a study sized for this CPU ({CPU_STUDY}), or add "
                        "train.device=cpu to run this one here anyway")

    # -------------------------------------------------------------- claiming trials
    def _grid_covered(self, trials) -> bool:
        from optuna.trial import TrialState

        grid = {k: {repr(v) for v in values} for k, values in self.spec.grid().items()}
        seen = set()
        for t in trials:
            if t.state == TrialState.WAITING or set(t.params) != set(grid):
                continue
            if all(repr(v) in grid[k] for k, v in t.params.items()):
                seen.add(tuple(sorted((k, repr(v)) for k, v in t.params.items())))
        return len(seen) >= self.spec.grid_size()

    def _claim(self):
        """The next trial to run: fail stale trials, count, then ask, under the study lock.
        Returns None when the study has its total and no other process's trial is still running
        (those are waited for while heartbeats are on: if their process died, the retry is run
        here)."""
        wait_s = 0.5
        while True:
            try:
                trial, others = self._claim_once()
            finally:
                self._tell_lost()  # MLflow calls and scancel after the lock: the others wait on it
            if trial is not None or others is None:
                return trial
            if not self._announced_wait:
                self._announced_wait = True
                self.say(f"waiting for trial(s) {', '.join(map(str, others))} of other sweep processes "
                         f"(a trial whose process died is failed after {self._grace_s():.0f} s and re-run here)")
            if self.stop_event.wait(wait_s):
                return None
            wait_s = min(wait_s * 1.5, max(0.5, min(float(self.spec.heartbeat_interval_s), 10.0)))

    def _claim_once(self):
        """One pass under the study lock: (the asked trial, None), or (None, other processes'
        running trial numbers to wait for), or (None, None) when there is nothing to do."""
        import optuna
        from optuna.trial import TrialState

        with self.lock:
            if self.stop_event.is_set():
                return None, None
            study = self.study
            if self._heartbeat:
                optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            done = sum(counts_toward_total(t) for t in trials) >= self.n_trials
            if not done and self.spec.sampler == "grid" and not waiting and self._grid_covered(trials):
                done = True
            if not done:
                # A fresh sampler seeded by the trial count: reproducible, and two sweep processes
                # started together do not draw the same random start-up points.
                study.sampler = self._make_sampler(trial_seed(self.spec.seed, len(trials)))
                trial = study.ask(self.spec.distributions())
                if self._heartbeat:
                    self._heartbeats[trial.number] = HeartbeatThread(
                        study._storage, trial._trial_id, float(self.spec.heartbeat_interval_s)).start()
                with self._state_lock:
                    self._active[trial.number] = (trial, dict(trial.params))
                    self._owned.add(trial.number)
                return trial, None
            with self._state_lock:
                mine = set(self._owned)
            others = [t.number for t in trials if t.state == TrialState.RUNNING and t.number not in mine]
            if not (self._heartbeat and others and self.n_trials > 0):
                return None, None
            return None, others

    def _grace_s(self) -> float:
        interval = float(self.spec.heartbeat_interval_s or 0)
        return float(self.spec.grace_period_s or 2 * interval)

    def _stop_heartbeat(self, number: int) -> None:
        beat = self._heartbeats.pop(number, None)
        if beat is not None:
            beat.stop()

    def _on_stale(self, study, trial) -> None:
        """Optuna's stale-trial callback (inside ``fail_stale_trials``, under the study lock, in
        the one process that failed the trial): queue it again once — like Optuna's
        ``RetryHeartbeatStaleTrialCallback`` (same ``failed_trial``/``retry_history`` system
        attributes) but without the dead run's own attributes. The queueing must happen under the
        lock (the count stays exact); closing its MLflow run waits for :meth:`_tell_lost`."""
        import optuna

        system_attrs = {"failed_trial": trial.number, "retry_history": [], **trial.system_attrs}
        system_attrs["retry_history"] = [*system_attrs["retry_history"], trial.number]
        retried = len(system_attrs["retry_history"]) <= STALE_RETRIES
        if retried:
            user_attrs = {k: trial.user_attrs[k] for k in KEPT_ON_RETRY if k in trial.user_attrs}
            user_attrs.update(retry_of=trial.number, retry_reason="worker_lost")
            study.add_trial(optuna.create_trial(state=optuna.trial.TrialState.WAITING, params=trial.params,
                                                distributions=trial.distributions, user_attrs=user_attrs,
                                                system_attrs=system_attrs))
        attrs = trial.user_attrs
        where = " ".join(f"{k}={attrs[k]}" for k in ("host", "pid", "job_id") if attrs.get(k) is not None)
        message = (f"the sweep process running trial {trial.number} ({where or 'unknown worker'}) sent no heartbeat "
                   f"for over {self._grace_s():.0f} s; failed by {socket.gethostname()} pid {os.getpid()}"
                   + ("; queued again" if retried else "; already retried, not queued again"))
        with self._state_lock:
            self._lost.append((trial, message))

    def _tell_lost(self) -> None:
        """For the trials :meth:`_on_stale` failed: cancel a SLURM job, close the MLflow run, say it."""
        with self._state_lock:
            lost, self._lost = self._lost, []
        for trial, message in lost:
            attrs = trial.user_attrs
            if attrs.get("launcher") == "submitit" and attrs.get("cluster") == "slurm" and attrs.get("job_id"):
                launchers.cancel_job(attrs["job_id"])  # its job would run on, unobserved
            if self.tracker is not None:
                try:
                    self.tracker.close_lost(trial, message, self._where_tags(attrs))
                except Exception as err:  # noqa: BLE001
                    self.say(f"[trial {trial.number}] warning: could not close its MLflow run: {err}")
            self.say(f"[trial {trial.number}] FAIL(worker_lost) {message}")

    @staticmethod
    def _where_tags(attrs: Dict[str, Any]) -> Dict[str, Any]:
        return {k: attrs.get(k) for k in ("launcher", "ranks", "job_id", "host") if attrs.get(k) is not None}

    # -------------------------------------------------------------- one trial
    def _overrides(self, trial) -> List[str]:
        return [*self.spec.base_overrides, *self.extra_overrides, *trial_overrides(trial.params)]

    def _tracking_overrides(self, number: int) -> List[str]:
        if self.tracker is None:
            return ["tracking=none"]
        # tags the trial's run carries from its start: another sweep process finds it by them if
        # this one dies; `ranks`/`launcher` say how it ran (the trainer adds `host`)
        tags = {"optuna_study": self.spec.study_name, "optuna_trial_number": str(number),
                "launcher": self.spec.launcher, "ranks": str(getattr(self.launcher, "ranks", 1))}
        return [format_override("tracking.uri", self.tracking_uri),
                format_override("tracking.experiment", self.spec.experiment_name),
                format_override("tracking.parent_run_id", self.tracker.run_id),
                format_override("tracking.run_name", f"{self.spec.study_name}-trial-{number}"),
                *(format_override(f"++tracking.tags.{k}", str(v)) for k, v in tags.items())]

    def _precheck_applies(self, overrides: Sequence[str]) -> bool:
        """The estimator predicts CUDA reserved memory: compare it with the budget only for
        trials that run on CUDA (``auto``), unless the study file says true/false."""
        mode = self.spec.precheck_memory
        if mode in (True, False):
            return mode
        device = override_value(overrides, "train.device") or "auto"
        if device.startswith("cuda"):
            return True
        return device == "auto" and self._has_cuda()

    def _failed_twin(self, trial):
        """An earlier trial with the same parameters that failed deterministically (Optuna's
        samplers ignore FAIL trials, so TPE may propose an OOM configuration again)."""
        from optuna.trial import TrialState

        for other in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            if (other.number != trial.number and other.params == trial.params
                    and other.user_attrs.get("failure_reason") in DETERMINISTIC_FAILURES
                    and not other.user_attrs.get(STOPPED_ATTR)):
                return other
        return None

    def _run_one(self, trial) -> None:
        spec = self.spec
        number, params = trial.number, dict(trial.params)
        overrides = self._overrides(trial)
        run_dir = self.runs_root / "sweeps" / spec.study_name / f"trial-{number}"
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("overrides", overrides)
        repeat = self._failed_twin(trial)
        predicted = None
        if repeat is not None:
            outcome = runner.Outcome(
                "FAIL", reason="repeat_of_failed",
                message=f"same parameters as trial {repeat.number}, which failed "
                        f"({repeat.user_attrs.get('failure_reason')}); not launched again")
            trial.set_user_attr("repeat_of", repeat.number)
            self._record(trial, params, outcome)
            return
        if spec.memory_budget_mb is not None and self._precheck_applies(overrides):
            with self._predict_lock:  # the estimator is not known to be thread-safe
                predicted = self.predict(overrides)
        if predicted is not None:
            trial.set_user_attr("predicted_peak_mb", predicted)
        if predicted is not None and predicted > spec.memory_budget_mb:
            outcome = runner.Outcome(
                "PRUNED", reason="predicted_over_budget",
                message=f"predicted peak {predicted:.0f} MB > budget {spec.memory_budget_mb:.0f} MB; not launched")
            trial.set_constraint("memory_budget_mb", predicted - spec.memory_budget_mb)
        else:
            cmd = runner.build_command(self.trainer_cmd, [
                *overrides, format_override("hydra.run.dir", str(run_dir)), *self._tracking_overrides(number)])
            self.say(f"[trial {number}] start    {self._params_text(params)}  -> {run_dir}")
            env_extra = {"PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}
            threads = cpu_threads_per_worker(self.workers * getattr(self.launcher, "ranks", 1))
            if threads and spec.launcher != "submitit":
                env_extra.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)

            def started(info: Dict[str, Any]) -> None:
                for key, value in info.items():
                    trial.set_user_attr(key, value)
                if info.get("job_id"):
                    self.say(f"[trial {number}] submitted as {info.get('cluster', '')} job {info['job_id']}")

            self.launched.append(number)
            kwargs = {"tag_job": self.tracker is not None} if spec.launcher == "submitit" else {}
            outcome = self.launcher.run(cmd, run_dir, spec.objectives, timeout_s=spec.timeout_per_trial_s,
                                        stop_event=self.stop_event, env_extra=env_extra, procs=self._procs,
                                        on_start=started, trial_number=number, **kwargs)
            host = launchers.job_info(run_dir).get("host")
            if host:
                trial.set_user_attr("host", host)
        self._record(trial, params, outcome)

    def _record(self, trial, params: Dict[str, Any], outcome: runner.Outcome) -> None:
        from optuna.trial import TrialState

        spec, number = self.spec, trial.number
        if not self._close(number):  # abandoned by a second Ctrl-C and already told
            return
        summary = outcome.summary or {}
        attrs: Dict[str, Any] = {
            "exit_code": outcome.exit_code, "duration_s": round(outcome.duration_s, 3),
            "mlflow_run_id": outcome.mlflow_run_id,
            "peak_memory_mb": extract_metric(summary, "peak_memory_mb"),
            "peak_memory_measure": summary.get("peak_memory_measure"),
            "process_peak_rss_mb": extract_metric(summary, "process_peak_rss_mb"),
            **{name: extract_metric(summary, name) for name in runner.QUALITY_METRICS},
            "it_per_s": extract_metric(summary, "it_per_s"),
            "fid_extractor": summary.get("fid_extractor"),
            "device": summary.get("device"), "iteration": summary.get("iteration"),
        }
        if outcome.state != "COMPLETE":
            attrs.update(failure_reason=outcome.reason, message=outcome.message[:4000])
            if outcome.stderr_tail:
                attrs["stderr_tail"] = outcome.stderr_tail[-2000:]
        if outcome.state == "COMPLETE" and spec.memory_budget_mb is not None:
            peak = attrs["peak_memory_mb"]
            if peak is None:
                outcome = runner.Outcome("FAIL", reason="missing_metric", message="metrics.json has no peak_memory_mb, "
                                         "needed for memory_budget_mb", summary=summary, exit_code=outcome.exit_code,
                                         duration_s=outcome.duration_s)
                attrs.update(failure_reason=outcome.reason, message=outcome.message)
            else:
                trial.set_constraint("memory_budget_mb", peak - spec.memory_budget_mb)
        stops = self._every_trial_would_fail(outcome)
        if stops:
            attrs[STOPPED_ATTR] = True
        # MLflow first (the run id becomes a user attribute); never let it lose the trial.
        if self.tracker is not None and not (stops and not outcome.mlflow_run_id):  # no run for what never ran
            try:
                self._record_mlflow(trial, params, outcome, attrs)
            except Exception as err:  # noqa: BLE001
                self.say(f"[trial {number}] warning: MLflow update failed: {err}")
        from optuna.exceptions import UpdateFinishedTrialError

        state = {"COMPLETE": TrialState.COMPLETE, "FAIL": TrialState.FAIL, "PRUNED": TrialState.PRUNED}[outcome.state]
        try:
            for key, value in attrs.items():
                if value is not None:
                    trial.set_user_attr(key, value)
            self._tell(trial, outcome.values if state == TrialState.COMPLETE else None, state)
        except UpdateFinishedTrialError:
            # our heartbeats did not reach the storage for grace_period_s: another process failed the
            # trial and queued it again; this result is not recorded twice
            self.say(f"[trial {number}] {outcome.state} but already failed by another sweep process (no heartbeat "
                     "reached the storage in time); its retry records the result")
            return
        if outcome.reason in RETRIED_REASONS or stops:
            with self.lock:  # queue the same parameters again; a resumed sweep runs them
                self.study.enqueue_trial(params, user_attrs={"retry_of": number})
        self.say(self._result_line(number, params, outcome, attrs, trial))
        if stops:
            self._stop_sweep(number, outcome)

    def _record_mlflow(self, trial, params: Dict[str, Any], outcome: runner.Outcome, attrs: Dict[str, Any]) -> None:
        """Tag the trial's MLflow run, or record one for a trial that never made its own."""
        where = self._where_tags(trial.user_attrs)
        if outcome.mlflow_run_id:
            self.tracker.annotate_child(outcome.mlflow_run_id, trial.number, outcome.state, outcome.reason,
                                        outcome.message, where)
        elif outcome.state != "COMPLETE":
            predicted = trial.user_attrs.get("predicted_peak_mb")
            extra = {"predicted_peak_mb": f"{predicted:.1f}"} if predicted is not None else {}
            extra.update({k: str(v) for k, v in where.items()})
            attrs["mlflow_run_id"] = self.tracker.record_unlaunched(
                trial.number, params, outcome.state, outcome.reason or "error", outcome.message, extra)

    def _every_trial_would_fail(self, outcome: runner.Outcome) -> bool:
        """A config/data error or a trainer that cannot start, unless the message names a searched
        key (then this trial's values caused it, e.g. a batch size the config refuses) and is not
        about the key itself (a searched key the config lacks fails every value)."""
        if outcome.state != "FAIL" or outcome.reason not in STOPPING_REASONS:
            return False
        if KEY_ERRORS.search(outcome.message):
            return True
        return not any(key in outcome.message for key in self.spec.search_space)

    def _stop_sweep(self, number: int, outcome: runner.Outcome) -> None:
        """The first failure every trial would meet stops the sweep: no new trial, running ones
        are stopped like on Ctrl-C (and queued again)."""
        with self._state_lock:
            if self.stopped is not None:
                return
            self.stopped = (STOPPING_REASONS[outcome.reason],
                            f"trial {number}: {outcome.message.strip()[:1000]} -- every trial would fail this way "
                            f"({outcome.reason}), so the sweep stopped with its budget untouched (trial {number} is not "
                            "counted and is queued again): fix it and run the same command")
        self.stop_event.set()

    def _close(self, number: int) -> bool:
        with self._state_lock:
            if number in self._closed:
                return False
            self._closed.add(number)
            self._active.pop(number, None)
            return True

    def _tell(self, trial, values, state) -> None:
        try:
            self.study.tell(trial, values=values, state=state, skip_if_finished=True)
        except RuntimeError as err:
            # BruteForceSampler.after_trial calls study.stop() once the grid is done, which raises
            # outside study.optimize; the trial is already stored (tell's finally block).
            if "Study.stop" not in str(err):
                raise

    def _result_line(self, number, params, outcome, attrs, trial) -> str:
        state = outcome.state if outcome.state == "COMPLETE" else f"{outcome.state}({outcome.reason})"
        head = f"[trial {number}] {state:<10} {outcome.duration_s:7.1f}s  {self._params_text(params)}"
        if outcome.state == "COMPLETE":
            vals = " ".join(f"{o.metric}={v:.4g}" for o, v in zip(self.spec.objectives, outcome.values))
            extra = ""
            violation = trial.constraints.get("memory_budget_mb") if hasattr(trial, "constraints") else None
            if violation is not None and violation > 0:
                extra = f"  INFEASIBLE: peak {attrs['peak_memory_mb']:.0f} MB > budget {self.spec.memory_budget_mb:.0f} MB"
            return f"{head}  -> {vals}{extra}"
        return f"{head}  -> {outcome.message[:300]}"

    # -------------------------------------------------------------- main loop
    def _lose_storage(self, err: BaseException, trial=None) -> bool:
        """A storage error ends the sweep (no new trials; running ones finish and are recorded if
        the storage is back by then). False for anything else."""
        if not is_storage_error(err):
            return False
        if trial is not None:
            self._close(trial.number)
            if trial.number in self.launched:
                self._unrecorded.append(trial.number)
        with self._state_lock:
            first, running = self.storage_lost is None, sorted(self._active)
            if first:
                self.storage_lost = storage_cause(err)
        if first and running:
            self.say(f"storage {redact(self.storage_url)} stopped answering ({self.storage_lost}); no new trials; "
                     f"waiting for trial(s) {', '.join(map(str, running))} to finish")
        return True

    def _worker(self) -> None:
        while not self.stop_event.is_set() and self.storage_lost is None:
            try:
                trial = self._claim()
            except Exception as err:  # noqa: BLE001 - only a lost storage is expected here
                if self._lose_storage(err):
                    return
                raise
            if trial is None:
                return
            try:
                self._run_one(trial)
            except Exception as err:  # a driver bug: record it, keep the sweep going
                if self._lose_storage(err, trial):
                    continue
                message = traceback.format_exc()
                if not self._close(trial.number):
                    self.say(f"[trial {trial.number}] driver error after recording:\n{message}")
                    continue
                self.say(f"[trial {trial.number}] driver error:\n{message}")
                try:
                    trial.set_user_attr("failure_reason", "driver_error")
                    trial.set_user_attr("message", message[-4000:])
                    from optuna.trial import TrialState

                    self._tell(trial, None, TrialState.FAIL)
                except Exception:  # noqa: BLE001
                    pass
            finally:
                self._stop_heartbeat(trial.number)
                with self._state_lock:
                    self._owned.discard(trial.number)

    def run(self) -> SweepResult:
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
        try:
            from optuna.exceptions import ExperimentalWarning

            warnings.filterwarnings("ignore", category=ExperimentalWarning)
        except ImportError:
            pass
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        spec = self.spec
        self._check_machine()
        try:
            with self.lock:
                self.study = self._open_study()
            if self._moved_to is not None:
                self._move_to(self._moved_to)
                with self.lock:
                    self.study = self._open_study()
            with self.lock:
                if self.tracking_uri is not None:
                    self.tracker = SweepTracker(self.tracking_uri, spec, redact(self.storage_url))
                    self.tracker.ensure_parent(self.study)
        except Exception as err:  # noqa: BLE001 - a storage that does not answer at start is a bad argument
            self.lock.close()
            if is_storage_error(err) and not isinstance(err, StorageUnavailable):
                raise StorageUnavailable(f"storage {redact(self.storage_url)}: {storage_cause(err)}") from None
            raise
        existing = self.study.get_trials(deepcopy=False)
        done = sum(counts_toward_total(t) for t in existing)
        self.say(f"study {spec.study_name!r} ({spec.sampler}, objectives "
                 f"{', '.join(f'{o.direction} {o.metric}' for o in spec.objectives)}) in {redact(self.storage_url)}")
        self.say(f"  {done}/{self.n_trials} trials counted so far; {self.workers} worker(s); runs in "
                 f"{self.runs_root / 'sweeps' / spec.study_name}"
                 + (f"; MLflow parent run {self.tracker.run_id} ({self.tracking_uri})" if self.tracker else ""))
        interrupted = False
        self._running_workers = self.workers
        threads = [threading.Thread(target=self._worker_main, name=f"sweep-worker-{i}", daemon=True)
                   for i in range(self.workers)]
        for t in threads:
            t.start()
        # Poll with time.sleep, not Thread.join: a join interrupted by KeyboardInterrupt can
        # leave the Thread object reporting is_alive() == False while it still runs.
        try:
            while self._workers_left():
                time.sleep(0.2)
        except KeyboardInterrupt:
            interrupted = True
            self.say("interrupt: stopping running trials (they are queued again for the next run); "
                     "press Ctrl-C again to abandon them")
            self.stop_event.set()
            try:
                while self._workers_left():
                    time.sleep(0.2)
            except KeyboardInterrupt:
                self._abandon_running()
        return self.finish(interrupted)

    def _workers_left(self) -> int:
        with self._state_lock:
            return self._running_workers

    def _worker_main(self) -> None:
        try:
            self._worker()
        except BaseException:  # noqa: BLE001 - never die silently
            self.say(f"worker error:\n{traceback.format_exc()}")
        finally:
            with self._state_lock:
                self._running_workers -= 1

    def _abandon_running(self) -> None:
        """Second Ctrl-C: kill the trainers, record their trials as interrupted (queued again)."""
        from optuna.trial import TrialState

        for proc in list(self._procs):
            runner.signal_group(proc, signal.SIGKILL)
        with self._state_lock:
            active = list(self._active.items())
        for number, (trial, params) in active:
            if not self._close(number):
                continue
            try:
                trial.set_user_attr("failure_reason", "interrupted")
                trial.set_user_attr("message", "abandoned by a second interrupt of the sweep")
                self._tell(trial, None, TrialState.FAIL)
                self.study.enqueue_trial(params, user_attrs={"retry_of": number})
                self.say(f"[trial {number}] FAIL(interrupted) abandoned")
            except Exception as err:  # noqa: BLE001
                self.say(f"[trial {number}] could not record the interruption: {err}")

    def finish(self, interrupted: bool = False) -> SweepResult:
        if self.storage_lost is not None:  # nothing more can be read or written there
            self.lock.close()
            return SweepResult(self.spec.study_name, self.storage_url, self.tracker.run_id if self.tracker else None,
                               [], list(self.launched), interrupted, self.study, self.lost_message())
        if self.stopped is not None:
            return self._finish_stopped(interrupted)
        front = pareto_trials(self.study)
        trials = self.study.get_trials(deepcopy=False)
        counts: Dict[str, int] = {}
        for t in trials:
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
        infeasible = sum(1 for t in trials if t.state.name == "COMPLETE" and any(v > 0 for v in t.constraints.values()))
        self.say(f"study {self.spec.study_name!r}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                 + (f" ({infeasible} over the memory budget)" if infeasible else "")
                 + f"; launched {len(self.launched)} now")
        self.say(f"Pareto front ({len(front)} trial(s); "
                 + ", ".join(f"{o.direction} {o.metric}" for o in self.spec.objectives) + "):")
        self.say(format_table(front, self.spec))
        if self.tracker is not None:
            from optuna.trial import TrialState

            try:
                with self.lock:  # one writer of the parent's artifacts at a time
                    trials = self.study.get_trials(deepcopy=False)
                    front = pareto_trials(self.study)
                    # the last sweep process to finish ends the parent run; earlier ones leave it RUNNING
                    others = any(t.state == TrialState.RUNNING for t in trials)
                    self.tracker.log_results(self.study, front, status="KILLED" if interrupted else "FINISHED",
                                             terminate=not others)
                self.say(f"MLflow: parent run {self.tracker.run_id} (pareto.json, pareto.png) in {self.tracking_uri}")
            except Exception as err:  # noqa: BLE001
                self.say(f"warning: could not log the Pareto front to MLflow: {err}")
        self.lock.close()
        return SweepResult(self.spec.study_name, self.storage_url, self.tracker.run_id if self.tracker else None,
                           front, list(self.launched), interrupted, self.study)


    def _finish_stopped(self, interrupted: bool) -> SweepResult:
        """After a failure every trial would meet: no Pareto front (nothing new was measured);
        the MLflow parent ends FAILED unless another process still runs trials of the study."""
        from optuna.trial import TrialState

        if self.tracker is not None:
            try:
                with self.lock:
                    running = any(t.state == TrialState.RUNNING for t in self.study.get_trials(deepcopy=False))
                    if not running:
                        self.tracker.client.set_terminated(self.tracker.run_id, status="FAILED")
            except Exception as err:  # noqa: BLE001
                self.say(f"warning: could not end the MLflow parent run: {err}")
        self.lock.close()
        code, message = self.stopped
        return SweepResult(self.spec.study_name, self.storage_url, self.tracker.run_id if self.tracker else None,
                           [], list(self.launched), interrupted, self.study, stopped=message, stopped_code=code)

    def lost_message(self) -> str:
        """The one line a lost storage ends the sweep with."""
        unrecorded = (f"; trial(s) {', '.join(map(str, self._unrecorded))} ran but could not be recorded (their run "
                      "folders and MLflow runs are kept; they run again)" if self._unrecorded else "")
        return (f"storage {redact(self.storage_url)} stopped answering ({self.storage_lost}){unrecorded}; the study "
                f"keeps what it had recorded: run the same command again once it answers (running trials are failed "
                f"after grace_period_s and queued again)")


def install_sigterm_as_interrupt() -> None:
    """SIGTERM (a scheduler stopping the job) behaves like Ctrl-C: running trials are stopped
    cleanly and queued again."""
    if threading.current_thread() is threading.main_thread():
        def _raise(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, _raise)


def main_exit_code(result: SweepResult) -> int:
    if result.storage_lost is not None:
        return EXIT_STORAGE_LOST
    if result.stopped is not None:
        return result.stopped_code
    return 130 if result.interrupted else 0


__all__ = ["Sweep", "SweepResult", "counts_toward_total", "install_sigterm_as_interrupt", "main_exit_code"]
