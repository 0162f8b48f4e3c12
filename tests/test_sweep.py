"""Sweep driver (grafccsr.sweep / grafccsr.sweeping).

Most tests drive the real driver against a fake trainer (a tiny script honouring the trainer's
command-line + metrics.json contract, seconds per study). ``test_real_smoke_study`` runs three
real ``python -m grafccsr.train`` trials end to end with MLflow.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from grafccsr.sweeping.spec import (SpecError, format_override, format_value, load_spec, parse_spec,
                                    trial_overrides)

PROJECT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- fake trainer

FAKE_TRAINER = textwrap.dedent(r'''
    """Fake `python -m grafccsr.train`: same overrides in, same metrics.json + exit codes out."""
    import json, os, signal, sys, time
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    def get(key, default=None):
        for k in (key, "+" + key):
            if k in args:
                return args[k].strip("'")
        return default
    run_dir = get("hydra.run.dir")
    os.makedirs(run_dir, exist_ok=True)
    log = os.environ.get("FAKE_TRAINER_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps(sys.argv[1:]) + "\n")
    bs = int(get("train.batch_size", 2)); spr = int(get("model.render.samples_per_ray", 8))
    policy = get("train.amp.policy", "off")
    base = {"iteration": 4, "max_iters": 4, "exp_name": "fake", "mlflow_run_id": None, "tracking_uri": None,
            "device": "cpu", "memory": {}, "peak_memory_measure": "peak_live_tensors",
            "process_peak_rss_mb": 100.0, "perf": {"perf/it_per_s": 10.0 / bs}, "losses": {},
            "fid_extractor": "fake", "output_dir": run_dir, "checkpoint": ""}
    # an MLflow run through the REST API of a tracking server (as the trainer would make it), so
    # the driver's child-run handling is exercised without importing mlflow here (seconds per trial)
    uri, run_id = get("tracking.uri"), None
    def rest(path, body=None):
        import urllib.request
        url = uri.rstrip("/") + "/api/2.0/mlflow/" + path
        req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"{}")
    if uri and uri.startswith("http") and args.get("tracking") != "none":
        import urllib.error, urllib.parse
        name = get("tracking.experiment")
        try:
            eid = rest("experiments/get-by-name?experiment_name=" + urllib.parse.quote(name))["experiment"]["experiment_id"]
        except urllib.error.HTTPError:
            eid = rest("experiments/create", {"name": name})["experiment_id"]
        tags = {k.split("tracking.tags.", 1)[1]: v.strip("'") for k, v in args.items() if "tracking.tags." in k}
        tags.update({"mlflow.parentRunId": get("tracking.parent_run_id"), "mlflow.runName": get("tracking.run_name"),
                     "host": os.uname().nodename})
        run = rest("runs/create", {"experiment_id": eid, "run_name": get("tracking.run_name"),
                                   "start_time": int(time.time() * 1000),
                                   "tags": [{"key": k, "value": v} for k, v in tags.items() if v]})
        run_id = base["mlflow_run_id"] = run["run"]["info"]["run_id"]
        base["tracking_uri"] = uri
    def write(**kw):
        base.update(kw)
        with open(os.path.join(run_dir, "metrics.json"), "w") as fh:
            json.dump(base, fh)
        if run_id:
            rest("runs/update", {"run_id": run_id, "status": kw["status"], "end_time": int(time.time() * 1000)})
    def on_sigint(*_):
        if os.environ.get("FAKE_TRAINER_FINISH_ON_SIGINT"):  # interrupted in its final evaluation, which completes
            write(status="FINISHED", reason=None, message="", peak_memory_mb=float(bs * spr),
                  eval={"fid": 1.0, "kid_mean": 0.01, "kid_std": 0.01, "extractor": "fake", "num_samples": 16})
            sys.exit(0)
        write(status="KILLED", reason="interrupted", message="interrupted", peak_memory_mb=None, eval={})
        sys.exit(130)
    signal.signal(signal.SIGINT, on_sigint)
    time.sleep(float(get("fake.sleep", os.environ.get("FAKE_TRAINER_SLEEP", "0"))))
    if get("fake.env") == "nocuda":  # what the trainer says on a machine without CUDA (exit 2)
        print("grafccsr.train: error: train.device=cuda but CUDA is not available on this machine; use cpu",
              file=sys.stderr); sys.exit(2)
    if get("fake.env") == "nodata":  # a dataset that cannot be read (exit 5)
        print("grafccsr.train: error: data: no images in /nowhere", file=sys.stderr); sys.exit(5)
    if get("fake.behave") == "config" or bs == 3:
        print("config error: train.batch_size=3 is not allowed here", file=sys.stderr); sys.exit(2)
    if get("fake.behave") == "crash" or bs == 5:
        print("Traceback (most recent call last):\nSegfaultish: boom", file=sys.stderr); sys.exit(1)
    peak = bs * spr * (0.5 if policy == "generator" else 1.0)
    if get("train.inject_oom_at", "-1") != "-1" or bs == 7:
        write(status="FAILED", reason="oom", message="CUDA out of memory (injected)", peak_memory_mb=peak, eval={})
        sys.exit(3)
    if get("fake.behave") == "noeval" or bs == 6:
        write(status="FINISHED", reason=None, message="", peak_memory_mb=peak, eval={}); sys.exit(0)
    fid = 1000.0 / (bs * spr) + (3.0 if policy == "generator" else 0.0)
    write(status="FINISHED", reason=None, message="", peak_memory_mb=peak,
          eval={"fid": fid, "kid_mean": fid / 100, "kid_std": 0.01, "extractor": "fake", "num_samples": 16})
''')


@pytest.fixture()
def fake_trainer(tmp_path):
    path = tmp_path / "fake_trainer.py"
    path.write_text(FAKE_TRAINER)
    return [sys.executable, str(path)]


def write_study(tmp_path: Path, name: str = "s", **fields) -> Path:
    spec = {
        "study_name": name,
        "sampler": "grid",
        "n_trials": 4,
        "objectives": [{"metric": "peak_memory_mb", "direction": "minimize"},
                       {"metric": "fid", "direction": "minimize"}],
        "base_overrides": ["+exp=smoke"],
        "search_space": {
            "train.batch_size": {"type": "categorical", "choices": [1, 2, 4, 8]},
            "model.render.samples_per_ray": {"type": "categorical", "choices": [4, 8]},
        },
        "heartbeat_interval_s": 60,
    }
    spec.update(fields)
    path = tmp_path / f"{name}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run(study_file, tmp_path, trainer, **kwargs):
    from grafccsr.sweeping.driver import Sweep

    lines = []
    kwargs.setdefault("storage", f"sqlite:///{tmp_path}/optuna.db")
    kwargs.setdefault("tracking_uri", "none")
    kwargs.setdefault("runs_root", tmp_path / "runs")
    sweep = Sweep(load_spec(study_file), trainer_cmd=trainer, out=lines.append, **kwargs)
    result = sweep.run()
    return result, lines


def brute_force_front(trials, directions):
    """Independent Pareto computation: COMPLETE, feasible (all constraints <= 0), non-dominated."""
    sign = [1.0 if d == "minimize" else -1.0 for d in directions]
    pts = {t.number: [s * v for s, v in zip(sign, t.values)] for t in trials
           if t.state.name == "COMPLETE" and all(c <= 0 for c in t.constraints.values())}

    def dominates(a, b):
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    return {n for n, p in pts.items() if not any(dominates(q, p) for m, q in pts.items() if m != n)}


def params_key(trial):
    return tuple(sorted(trial.params.items()))


# --------------------------------------------------------------------------- spec


def test_spec_yaml12_and_validation(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(textwrap.dedent("""
        study_name: a
        search_space:
          train.amp.policy: {type: categorical, choices: [off, generator]}
          memory.grad_checkpoint: [false, true]
          train.lr_g: {type: float, low: 1e-5, high: 1e-3, log: true}
    """))
    spec = load_spec(path)
    assert spec.search_space["train.amp.policy"].choices == ["off", "generator"]  # not False
    assert spec.search_space["memory.grad_checkpoint"].choices == [False, True]
    assert spec.search_space["train.lr_g"].low == pytest.approx(1e-5)
    assert spec.metric_names == ["peak_memory_mb", "fid_rf"] and spec.directions == ["minimize", "minimize"]
    assert spec.experiment_name == "sweep-a"

    base = {"study_name": "b", "search_space": {"train.batch_size": [1, 2]}}
    for bad in ({"n_trial": 3}, {"sampler": "cmaes!"}, {"objectives": [{"metric": "nope"}]},
                {"search_space": {"x": {"type": "int", "low": 5, "high": 1}}},
                {"search_space": {"x": {"type": "float", "low": 0.0, "high": 1.0}}, "sampler": "grid"},
                {"base_overrides": ["train.batch_size=2"]},
                {"enqueue": [{"train.batch_size": 3}]}, {"study_name": "has space"},
                {"launcher": "ssh"}, {"nproc_per_node": 2}, {"launcher": "torchrun", "nproc_per_node": 0},
                {"submitit": {"partition": "gpu"}}, {"launcher": "submitit", "submitit": {"gpu": 1}},
                {"launcher": "submitit", "submitit": {"cluster": "aws"}},
                {"heartbeat_interval_s": 10, "grace_period_s": 10}):
        with pytest.raises(SpecError):
            parse_spec({**base, **bad})
    torchrun = parse_spec({**base, "launcher": "torchrun", "nproc_per_node": 2})
    assert torchrun.command()[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                      "-m", "grafccsr.train"]
    assert torchrun.command(["py", "fake.py"])[-3:] == ["--no-python", "py", "fake.py"]
    sub = parse_spec({**base, "launcher": "submitit", "grace_period_s": 200,
                      "submitit": {"cluster": "local", "gpus_per_trial": 1, "mem_gb": 8, "time_limit_min": 30}})
    assert sub.submitit.cluster == "local" and sub.submitit.gpus_per_trial == 1 and sub.grace_period_s == 200


def test_override_formatting():
    assert format_value("off") == "off"
    assert format_value(True) == "true" and format_value(None) == "null"
    assert format_value(0.25) == "0.25" and format_value(8) == "8"
    assert format_value("true") == "'true'" and format_value("8") == "'8'"  # stay strings for Hydra
    assert format_value("a b") == "'a b'"
    assert format_override("hydra.run.dir", "/tmp/x y/trial-0") == "hydra.run.dir='/tmp/x y/trial-0'"
    assert trial_overrides({"train.amp.policy": "generator", "memory.grad_checkpoint": False}) == [
        "train.amp.policy=generator", "memory.grad_checkpoint=false"]


def test_shipped_study_files_compose():
    """Every smoke grid point and the memory_quality baseline compose and validate."""
    import itertools

    from hydra import compose, initialize_config_dir

    from grafccsr.config import register_configs, to_config
    from grafccsr.paths import CONF_DIR

    smoke = load_spec(PROJECT / "sweeps" / "smoke.yaml")
    mq = load_spec(PROJECT / "sweeps" / "memory_quality.yaml")
    assert {"off", "generator"} <= set(smoke.search_space["train.amp.policy"].choices)
    assert {"train.batch_size", "model.render.samples_per_ray", "train.amp.policy"} <= set(mq.search_space)
    assert "+exp=amp_bs8" in mq.base_overrides and "train.device=cuda" in mq.base_overrides
    assert smoke.n_trials <= 4 and "+exp=smoke" in smoke.base_overrides
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        grid = smoke.grid()
        for combo in itertools.product(*grid.values()):
            to_config(compose("config", overrides=smoke.base_overrides + trial_overrides(dict(zip(grid, combo)))))
        for params in mq.enqueue:
            cfg = to_config(compose("config", overrides=mq.base_overrides + trial_overrides(params)))
            assert cfg.train.device == "cuda" and cfg.train.batch_size == params["train.batch_size"]


# --------------------------------------------------------------------------- driver with a fake trainer


def test_states_reasons_budget_and_pareto(tmp_path, fake_trainer):
    study = write_study(
        tmp_path, n_trials=8, memory_budget_mb=20,
        search_space={"train.batch_size": {"type": "categorical", "choices": [1, 2, 3, 4, 5, 6, 7]},
                      "model.render.samples_per_ray": {"type": "categorical", "choices": [4, 8]}},
        # deterministic: one of each outcome, plus a second config to make the front non-trivial
        enqueue=[{"train.batch_size": 1, "model.render.samples_per_ray": 4},
                 {"train.batch_size": 1, "model.render.samples_per_ray": 8},
                 {"train.batch_size": 2, "model.render.samples_per_ray": 8},
                 {"train.batch_size": 4, "model.render.samples_per_ray": 8},   # peak 32 > budget 20
                 {"train.batch_size": 7, "model.render.samples_per_ray": 4},   # OOM (exit 3)
                 {"train.batch_size": 3, "model.render.samples_per_ray": 4},   # config error (exit 2)
                 {"train.batch_size": 5, "model.render.samples_per_ray": 4},   # crash, no metrics.json
                 {"train.batch_size": 6, "model.render.samples_per_ray": 4}])  # no FID measured
    result, lines = run(study, tmp_path, fake_trainer, predict=lambda overrides: None)
    assert len(result.study.trials) == 8
    trials = {t.params["train.batch_size"]: t for t in result.study.trials
              if (t.params["train.batch_size"], t.params["model.render.samples_per_ray"]) != (1, 8)}
    states = {bs: (t.state.name, t.user_attrs.get("failure_reason")) for bs, t in trials.items()}
    assert states == {1: ("COMPLETE", None), 2: ("COMPLETE", None), 4: ("COMPLETE", None),
                      7: ("FAIL", "oom"), 3: ("FAIL", "config"), 5: ("FAIL", "crash"),
                      6: ("FAIL", "missing_metric")}
    assert "train.batch_size=3 is not allowed" in trials[3].user_attrs["message"]
    assert "Segfaultish" in trials[5].user_attrs["stderr_tail"]
    assert trials[7].values is None and trials[7].user_attrs["peak_memory_mb"] == 28.0  # measured, not a value
    # budget: COMPLETE but infeasible, constraint = peak - budget
    assert trials[4].constraints == {"memory_budget_mb": 32.0 - 20}
    assert trials[2].constraints == {"memory_budget_mb": 16.0 - 20}
    for t in result.study.trials:
        if t.values is not None:
            assert all(math.isfinite(v) for v in t.values)
    # Pareto = independent brute force over feasible COMPLETE trials
    expected = brute_force_front(result.study.trials, ["minimize", "minimize"])
    assert {t.number for t in result.pareto} == expected
    assert trials[4].number not in expected and expected  # the infeasible one is excluded
    # console: one start line per launch, one result line per trial, and the table
    assert sum("] start" in ln for ln in lines) == 8
    assert any("FAIL(oom)" in ln for ln in lines) and any("INFEASIBLE" in ln for ln in lines)
    table = "\n".join(lines[lines.index(next(ln for ln in lines if ln.startswith("Pareto front"))):])
    assert "peak MB" in table and "FID" in table


def test_resume_grid_sampler_never_repeats(tmp_path, fake_trainer):
    study = write_study(tmp_path, n_trials=3)
    first, _ = run(study, tmp_path, fake_trainer)
    assert len(first.launched) == 3
    second, _ = run(study, tmp_path, fake_trainer, n_trials=6)
    assert sorted(second.launched) == [3, 4, 5]
    third, _ = run(study, tmp_path, fake_trainer, n_trials=6)
    assert third.launched == []  # the study has its total
    trials = third.study.trials
    assert [t.number for t in trials] == list(range(6))
    assert len({params_key(t) for t in trials}) == 6
    # beyond the grid (8 points) it stops at the grid's size, still without repeats
    fourth, _ = run(study, tmp_path, fake_trainer, n_trials=20)
    assert len(fourth.study.trials) == 8 and len({params_key(t) for t in fourth.study.trials}) == 8


def test_two_processes_share_one_study(tmp_path, fake_trainer):
    """Two sweep processes on one SQLite study: every trial exactly once, total == requested."""
    study = write_study(tmp_path, n_trials=6)
    log = tmp_path / "launches.jsonl"
    env = dict(os.environ, FAKE_TRAINER_SLEEP="0.4", FAKE_TRAINER_LOG=str(log))
    cmd = [sys.executable, "-c",
           "import sys; from grafccsr.sweeping.driver import Sweep; from grafccsr.sweeping.spec import load_spec;"
           f"Sweep(load_spec({str(study)!r}), storage={f'sqlite:///{tmp_path}/optuna.db'!r}, tracking_uri='none',"
           f" runs_root={str(tmp_path / 'runs')!r}, trainer_cmd={fake_trainer!r}, workers=2).run()"]
    procs = [subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    import optuna

    from grafccsr.sweeping.storage import make_storage

    storage = make_storage(f"sqlite:///{tmp_path}/optuna.db")
    conn = storage.engine.raw_connection()
    assert conn.cursor().execute("PRAGMA busy_timeout").fetchall() == [(60000,)]  # concurrent writers wait
    conn.close()
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert len({params_key(t) for t in trials}) == 6
    launches = [json.loads(line) for line in log.read_text().splitlines()]
    run_dirs = [a for argv in launches for a in argv if a.startswith("hydra.run.dir=")]
    assert len(run_dirs) == 6 == len(set(run_dirs))  # each trial launched once
    assert sum(o.count("] start") for o in outs) == 6


def test_threads_journal_storage(tmp_path, fake_trainer, monkeypatch):
    """--workers 3 in one process with TPE on a journal file: distinct numbers, exact count."""
    monkeypatch.setenv("FAKE_TRAINER_SLEEP", "0.2")
    study = write_study(tmp_path, sampler="tpe", n_trials=7, sampler_options={"n_startup_trials": 3},
                        search_space={"train.batch_size": {"type": "int", "low": 1, "high": 2},
                                      "model.render.samples_per_ray": {"type": "int", "low": 4, "high": 64,
                                                                       "log": True}})
    result, _ = run(study, tmp_path, fake_trainer, storage=f"journal:{tmp_path}/optuna.journal", workers=3)
    trials = result.study.trials
    assert sorted(t.number for t in trials) == list(range(7)) and sorted(result.launched) == list(range(7))
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert {t.number for t in result.pareto} == brute_force_front(trials, ["minimize", "minimize"])
    again, _ = run(study, tmp_path, fake_trainer, storage=f"journal:{tmp_path}/optuna.journal", workers=3)
    assert again.launched == [] and len(again.study.trials) == 7


def sigint_as_in_a_terminal():
    """A child's SIGINT as a terminal leaves it (default): a shell running the suite in the
    background (`make test &`, nohup) leaves SIGINT ignored, children inherit that, and a Python
    started with it ignored never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_the_sweep_in_its_first_trial(study, tmp_path):
    """Ctrl-C to the sweep CLI once its first trial runs; returns the ended process and its output."""
    proc = subprocess.Popen([sys.executable, "-m", "grafccsr.sweep", str(study), "--storage",
                             f"sqlite:///{tmp_path}/optuna.db", "--tracking-uri", "none", "--runs-root",
                             str(tmp_path / "runs")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=sigint_as_in_a_terminal)
    output = []
    for line in proc.stdout:  # wait until the trial runs
        output.append(line)
        if "] start" in line:
            break
    time.sleep(1.5)  # let the fake trainer install its SIGINT handler
    proc.send_signal(signal.SIGINT)
    output.append(proc.communicate(timeout=60)[0])
    return proc, output


def test_interrupt_requeues_and_timeout(tmp_path, fake_trainer, monkeypatch):
    """Ctrl-C on the CLI: the running trainer is stopped, its trial is FAIL/interrupted, does
    not count, and its parameters are queued again; exit code 130."""
    import optuna

    from grafccsr.sweeping.driver import counts_toward_total

    monkeypatch.setenv("FAKE_TRAINER_SLEEP", "30")
    study = write_study(tmp_path, n_trials=2, trainer_cmd=fake_trainer,
                        enqueue=[{"train.batch_size": 2, "model.render.samples_per_ray": 4}])
    proc, output = interrupt_the_sweep_in_its_first_trial(study, tmp_path)
    assert proc.returncode == 130, "".join(output)
    assert "FAIL(interrupted)" in "".join(output)
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db").trials
    assert trials[0].state.name == "FAIL" and trials[0].user_attrs["failure_reason"] == "interrupted"
    assert not counts_toward_total(trials[0])
    assert trials[1].state.name == "WAITING" and trials[1].system_attrs["fixed_params"] == trials[0].params
    # resume: the interrupted parameters run first; a 1 s per-trial timeout fails the next one
    monkeypatch.setenv("FAKE_TRAINER_SLEEP", "0")
    resumed, _ = run(study, tmp_path, fake_trainer, n_trials=1)
    t1 = resumed.study.trials[1]
    assert t1.state.name == "COMPLETE" and t1.user_attrs["retry_of"] == 0
    monkeypatch.setenv("FAKE_TRAINER_SLEEP", "30")
    spec_file = write_study(tmp_path, n_trials=2, timeout_per_trial_s=1.0)
    timed, _ = run(spec_file, tmp_path, fake_trainer)
    t2 = timed.study.trials[2]
    assert t2.state.name == "FAIL" and t2.user_attrs["failure_reason"] == "timeout"
    assert t2.user_attrs["duration_s"] < 20


def test_interrupt_during_a_trials_final_evaluation_keeps_its_result(tmp_path, fake_trainer, monkeypatch):
    """The sweep is interrupted while a trainer finishes (its final evaluation completes, exit 0,
    metrics.json FINISHED): the trial is COMPLETE with its values and is not queued again."""
    import optuna

    monkeypatch.setenv("FAKE_TRAINER_SLEEP", "30")
    monkeypatch.setenv("FAKE_TRAINER_FINISH_ON_SIGINT", "1")
    study = write_study(tmp_path, n_trials=2, trainer_cmd=fake_trainer,
                        enqueue=[{"train.batch_size": 2, "model.render.samples_per_ray": 4}])
    proc, output = interrupt_the_sweep_in_its_first_trial(study, tmp_path)
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db").trials
    assert trials[0].state.name == "COMPLETE" and trials[0].values == [8.0, 1.0], "".join(output)
    assert not any(t.state.name == "WAITING" for t in trials)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::optuna.exceptions.ExperimentalWarning")
def test_dead_process_trial_is_retried_and_failed_twins_not_relaunched(tmp_path, fake_trainer):
    """A RUNNING trial whose sweep process died (no heartbeat) is failed and queued again, and
    does not use up n_trials; a configuration that already OOMed is not launched again."""
    import optuna

    from grafccsr.sweeping.storage import make_storage

    url = f"sqlite:///{tmp_path}/optuna.db"
    space = {"train.batch_size": {"type": "categorical", "choices": [1, 2, 4, 7]},
             "model.render.samples_per_ray": {"type": "categorical", "choices": [4, 8]}}
    study_file = write_study(tmp_path, n_trials=3, heartbeat_interval_s=1, search_space=space,
                             enqueue=[{"train.batch_size": 7, "model.render.samples_per_ray": 4}])
    spec = load_spec(study_file)
    storage = make_storage(url, heartbeat_interval_s=1)
    dead = optuna.create_study(study_name="s", storage=storage, directions=["minimize", "minimize"])
    dead.enqueue_trial({"train.batch_size": 1, "model.render.samples_per_ray": 4})
    orphan = dead.ask({"train.batch_size": spec.search_space["train.batch_size"].distribution(),
                       "model.render.samples_per_ray": spec.search_space["model.render.samples_per_ray"].distribution()})
    storage.record_heartbeat(orphan._trial_id)
    time.sleep(2.5)  # > grace period (2 x heartbeat interval)
    result, _ = run(study_file, tmp_path, fake_trainer, storage=url)
    trials = result.study.trials
    assert trials[0].state.name == "FAIL" and "failure_reason" not in trials[0].user_attrs
    assert trials[1].user_attrs["failure_reason"] == "oom"
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE" and retry[0].params == trials[0].params
    assert sorted(result.launched) == [1, 2, 3] and len(trials) == 4

    result.study.enqueue_trial({"train.batch_size": 7, "model.render.samples_per_ray": 4})
    again, lines = run(study_file, tmp_path, fake_trainer, storage=url, n_trials=4)
    twin = again.study.trials[4]
    assert twin.state.name == "FAIL" and twin.user_attrs["failure_reason"] == "repeat_of_failed"
    assert twin.user_attrs["repeat_of"] == 1 and again.launched == []


def test_predicted_over_budget_is_not_launched(tmp_path, fake_trainer):
    """The estimator hook: configs predicted over the budget are PRUNED with a (real, predicted)
    constraint and never launched; MLflow still gets a child run saying why."""
    from mlflow.tracking import MlflowClient

    study = write_study(tmp_path, n_trials=4, memory_budget_mb=100, precheck_memory=True,
                        enqueue=[{"train.batch_size": 8, "model.render.samples_per_ray": 4}])

    def predict(overrides):
        bs = int([o for o in overrides if o.startswith("train.batch_size=")][0].split("=")[1])
        return 50.0 * bs

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result, lines = run(study, tmp_path, fake_trainer, tracking_uri=uri, predict=predict)
    for t in result.study.trials:
        bs = t.params["train.batch_size"]
        if bs > 2:
            assert t.state.name == "PRUNED" and t.user_attrs["failure_reason"] == "predicted_over_budget"
            assert t.constraints == {"memory_budget_mb": 50.0 * bs - 100}
            assert not (Path(t.user_attrs["run_dir"]) / "metrics.json").exists()
        else:
            assert t.state.name == "COMPLETE" and t.user_attrs["predicted_peak_mb"] == 50.0 * bs
    assert any(t.state.name == "PRUNED" for t in result.study.trials)
    client = MlflowClient(uri)
    children = client.search_runs([client.get_run(result.parent_run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    pruned = [r for r in children if r.data.tags.get("failure_reason") == "predicted_over_budget"]
    assert len(pruned) == sum(t.state.name == "PRUNED" for t in result.study.trials)
    assert {r.info.run_id for r in pruned} == {t.user_attrs["mlflow_run_id"] for t in result.study.trials
                                               if t.state.name == "PRUNED"}
    assert all(float(r.data.tags["predicted_peak_mb"]) > 100 for r in pruned)


def test_cli_help_and_bad_file(tmp_path):
    start = time.time()
    out = subprocess.run([sys.executable, "-m", "grafccsr.sweep", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--workers" in out.stdout and "--storage" in out.stdout
    assert time.time() - start < 10
    bad = tmp_path / "bad.yaml"
    bad.write_text("study_name: x\nsearch_space: {}\n")
    out = subprocess.run([sys.executable, "-m", "grafccsr.sweep", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2 and "search_space" in out.stderr
    # a PostgreSQL storage that cannot be reached: one line, exit 2, no password shown
    study = write_study(tmp_path)
    out = subprocess.run([sys.executable, "-m", "grafccsr.sweep", str(study), "--tracking-uri", "none", "--storage",
                          "postgresql+psycopg2://u:secret@127.0.0.1:1/optuna"], capture_output=True, text=True)
    assert out.returncode == 2 and "cannot connect" in out.stderr and "secret" not in out.stderr, out.stderr


# --------------------------------------------------------------------------- failures every trial meets


def test_a_failure_every_trial_meets_stops_the_sweep_and_spends_nothing(tmp_path, fake_trainer):
    """A config error naming no searched key (here: no CUDA) stops the sweep after its first
    trial, met as a user does (the CLI): one line, exit 2, the trial is not counted and is queued
    again; the same command without the fault then runs the whole budget from 0, the failed
    baseline first and not mistaken for a known failure."""
    import optuna

    from grafccsr.sweeping.driver import counts_toward_total

    study = write_study(tmp_path, n_trials=4, trainer_cmd=fake_trainer,
                        enqueue=[{"train.batch_size": 2, "model.render.samples_per_ray": 4}])
    url = f"sqlite:///{tmp_path}/optuna.db"
    out = subprocess.run([sys.executable, "-m", "grafccsr.sweep", str(study), "--storage", url, "--tracking-uri",
                          "none", "--runs-root", str(tmp_path / "runs"), "--workers", "2", "fake.env=nocuda"],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, FAKE_TRAINER_SLEEP="0.5"))
    assert out.returncode == 2, out.stdout + out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "CUDA is not available" in out.stderr, out.stderr
    assert "not counted" in out.stderr and "Pareto front" not in out.stdout
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert not any(counts_toward_total(t) for t in trials), [(t.state, t.user_attrs) for t in trials]
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert failed and failed[0].user_attrs["stopped_sweep"] and failed[0].user_attrs["failure_reason"] == "config"
    assert len(failed) <= 2  # the first trial, and at most the one the second worker had started
    waiting = [tuple(sorted(t.system_attrs["fixed_params"].items())) for t in trials if t.state.name == "WAITING"]
    assert set(waiting) >= {params_key(t) for t in failed}  # queued again

    again, lines = run(study, tmp_path, fake_trainer, workers=2)
    assert any("0/4 trials counted so far" in ln for ln in lines), lines
    assert again.stopped is None and len(again.launched) == 4
    done = [t for t in again.study.trials if counts_toward_total(t)]
    assert len(done) == 4 and all(t.state.name == "COMPLETE" for t in done)
    assert {"train.batch_size": 2, "model.render.samples_per_ray": 4} in [t.params for t in done]


def test_data_errors_and_a_trainer_that_cannot_start_stop_too(tmp_path, fake_trainer):
    from grafccsr.sweeping.driver import main_exit_code

    study = write_study(tmp_path, n_trials=3)
    data, lines = run(study, tmp_path, fake_trainer, extra_overrides=["fake.env=nodata"])
    assert data.stopped and main_exit_code(data) == 5 and "no images in /nowhere" in data.stopped
    assert len(data.launched) == 1 and not any("Pareto" in ln for ln in lines)
    missing, _ = run(write_study(tmp_path, name="m", n_trials=3), tmp_path, [str(tmp_path / "no-such-trainer")])
    assert missing.stopped and main_exit_code(missing) == 2 and "could not start" in missing.stopped
    assert missing.study.trials[0].user_attrs["failure_reason"] == "launch" and len(missing.launched) == 1
    # the real trainer, a searched key it does not have: named in the message, yet every value fails
    typo = write_study(tmp_path, name="typo", n_trials=2, base_overrides=["+exp=smoke", "train.device=cpu"],
                       search_space={"train.batchsize": {"type": "categorical", "choices": [1, 2]}})
    wrong_key, _ = run(typo, tmp_path, None)
    assert wrong_key.stopped and "train.batchsize" in wrong_key.stopped and len(wrong_key.launched) == 1


def test_a_cuda_study_is_refused_without_cuda_and_make_sweep_picks_the_cpu_one(tmp_path):
    """Without CUDA (CUDA_VISIBLE_DEVICES='' makes any machine one): the GPU study is refused in
    one line before anything is created, unless train.device=cpu says to run it here; with no
    study named the CPU study runs, and the first line says which and why."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    url = f"sqlite:///{tmp_path}/optuna.db"
    base = [sys.executable, "-m", "grafccsr.sweep", "--storage", url, "--tracking-uri", "none",
            "--runs-root", str(tmp_path / "runs"), "--trials", "0"]
    refused = subprocess.run([*base, "memory_quality"], capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "no CUDA" in refused.stderr and "memory_quality_cpu" in refused.stderr and "train.device=cpu" in refused.stderr
    assert refused.stdout == "" and not (tmp_path / "optuna.db").exists()
    forced = subprocess.run([*base, "memory_quality", "train.device=cpu"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert forced.returncode == 0 and "study 'memory_quality'" in forced.stdout, forced.stderr
    chosen = subprocess.run(base, capture_output=True, text=True, env=env, timeout=120)
    assert chosen.returncode == 0, chosen.stderr
    first = chosen.stdout.splitlines()[0]
    assert first.startswith("no study named: memory_quality_cpu") and "no CUDA" in first
    assert "study 'memory_quality_cpu'" in chosen.stdout


# --------------------------------------------------------------------------- fixed overrides


def test_other_fixed_overrides_are_refused_or_go_to_a_new_study(tmp_path, fake_trainer):
    import optuna

    study = write_study(tmp_path, n_trials=2, trainer_cmd=fake_trainer)
    url = f"sqlite:///{tmp_path}/optuna.db"
    first, _ = run(study, tmp_path, fake_trainer, extra_overrides=["train.max_iters=4"])
    assert first.study.user_attrs["fixed_overrides"] == ["+exp=smoke", "train.max_iters=4"]
    cli = [sys.executable, "-m", "grafccsr.sweep", str(study), "--storage", url, "--tracking-uri", "none",
           "--runs-root", str(tmp_path / "runs"), "--trials", "4", "train.max_iters=8", "eval.num_samples=32"]
    refused = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "train.max_iters=4 -> train.max_iters=8" in refused.stderr and "added eval.num_samples=32" in refused.stderr
    assert "--new-study" in refused.stderr and "] start" not in refused.stdout
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 2

    moved = subprocess.run([*cli, "--new-study"], capture_output=True, text=True, timeout=120)
    assert moved.returncode == 0, moved.stderr
    name = next(s.study_name for s in optuna.get_all_study_summaries(url) if s.study_name.startswith("s-"))
    assert f"these trials go to study {name!r}" in moved.stdout and moved.stdout.count("] start") == 4
    assert optuna.load_study(study_name=name, storage=url).user_attrs["fixed_overrides"] == [
        "+exp=smoke", "train.max_iters=8", "eval.num_samples=32"]
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 2  # untouched
    resumed = subprocess.run([*cli, "--new-study"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0 and "4/4 trials counted" in resumed.stdout and "] start" not in resumed.stdout
    same, _ = run(study, tmp_path, fake_trainer, extra_overrides=["train.max_iters=4"], n_trials=3)
    assert same.launched == [2]  # the original overrides resume the original study


def test_a_study_from_before_the_record_is_checked_against_its_trials(tmp_path, fake_trainer):
    """A study whose trials ran before ``fixed_overrides`` was recorded: the trials' own overrides say."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    url = f"sqlite:///{tmp_path}/optuna.db"
    old = optuna.create_study(study_name="s", storage=url, directions=["minimize", "minimize"])
    old.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.COMPLETE, values=[1.0, 2.0], params={"train.batch_size": 2},
        distributions={"train.batch_size": CategoricalDistribution([1, 2, 4, 8])},
        user_attrs={"overrides": ["+exp=smoke", "train.max_iters=4", "train.batch_size=2"],
                    "failure_reason": None}))
    study = write_study(tmp_path, n_trials=2)
    with pytest.raises(SpecError, match="train.max_iters=4 -> train.max_iters=6"):
        run(study, tmp_path, fake_trainer, extra_overrides=["train.max_iters=6"])


def test_no_waiting_for_this_process_own_trials(tmp_path, fake_trainer, monkeypatch):
    """Two workers, the study's total reached while one trial is being recorded (a slow tell):
    the other worker must not report it as another sweep process's trial."""
    from grafccsr.sweeping.driver import Sweep

    monkeypatch.setenv("FAKE_TRAINER_SLEEP", "0.5")

    class SlowTell(Sweep):
        def _tell(self, trial, values, state):
            time.sleep(2.0)  # e.g. a slow MLflow server and database between closing and telling
            super()._tell(trial, values, state)

    lines = []
    sweep = SlowTell(load_spec(write_study(tmp_path, n_trials=2)), storage=f"sqlite:///{tmp_path}/optuna.db",
                     tracking_uri="none", runs_root=tmp_path / "runs", trainer_cmd=fake_trainer, workers=2,
                     out=lines.append)
    result = sweep.run()
    assert len(result.launched) == 2
    assert not any("waiting for trial" in ln for ln in lines), lines


# --------------------------------------------------------------------------- shipped studies, dashboard


def test_studies_are_found_by_name(tmp_path):
    from grafccsr.sweeping.spec import STUDIES_DIR, find_study, shipped_studies

    assert {"smoke", "memory_quality", "memory_quality_cpu", "occupancy"} <= set(shipped_studies())
    assert find_study("smoke") == find_study("smoke.yaml") == STUDIES_DIR / "smoke.yaml"
    own = write_study(tmp_path, name="smoke")  # a path wins over a name
    assert find_study(own) == own
    with pytest.raises(SpecError, match="shipped studies, by name: .*smoke"):
        find_study(tmp_path / "sweeps" / "smoke.yaml")


def test_dashboard_serves_the_sweeps_storage(tmp_path):
    """grafccsr-dashboard opens the storage in its own process, on loopback, and answers
    optuna-dashboard's API; a missing file and a public address are one line, exit 2."""
    pytest.importorskip("optuna_dashboard")
    import optuna
    import urllib.request

    from grafccsr.services.local import free_port

    url = f"sqlite:///{tmp_path}/optuna.db"
    optuna.create_study(study_name="shown", storage=url, directions=["minimize"]).add_trial(
        optuna.trial.create_trial(value=1.0))
    cmd = [sys.executable, "-m", "grafccsr.cli.dashboard"]
    missing = subprocess.run([*cmd, "--storage", f"sqlite:///{tmp_path}/none.db"], capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 2 and "no sweep storage" in missing.stderr and not (tmp_path / "none.db").exists()
    public = subprocess.run([*cmd, "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert public.returncode == 2 and "ssh -L" in public.stderr and len(public.stderr.strip().splitlines()) == 1
    port = free_port()
    server = subprocess.Popen([*cmd, "--port", str(port)], env=dict(os.environ, GRAFCCSR_STORAGE=url),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=sigint_as_in_a_terminal)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as resp:
                    studies = json.loads(resp.read())["study_summaries"]
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, server.communicate()[1]
                time.sleep(0.3)
        assert [s["study_name"] for s in studies] == ["shown"]
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0 and f"http://127.0.0.1:{port}/dashboard/" in out and "Traceback" not in err, err


# --------------------------------------------------------------------------- real trainer, end to end


@pytest.mark.slow  # long end to end; `make test-slow`
def test_real_smoke_study(tmp_path):
    """Three real smoke trials (one a real out-of-memory under a 6 GB address-space limit),
    MLflow parent/child links, Pareto artifact, then a second invocation that resumes the
    finished study and launches nothing."""
    from mlflow.tracking import MlflowClient

    study = write_study(
        tmp_path, name="real", n_trials=3,
        trainer_cmd=["prlimit", "--as=6442450944", "--", sys.executable, "-m", "grafccsr.train"],
        objectives=[{"metric": "peak_memory_mb", "direction": "minimize"},
                    {"metric": "fid_rf", "direction": "minimize"}],
        base_overrides=["+exp=smoke", "train.device=cpu", "train.max_iters=2", "eval.num_samples=8",
                        "eval.kid_subset_size=4", "train.sample_every=0", "train.ckpt_every=0",
                        "memory.no_grad_segment_points=1000000000"],
        search_space={"train.amp.policy": {"type": "categorical", "choices": ["off", "generator"]},
                      "model.render.samples_per_ray": {"type": "categorical", "choices": [4, 50000]}},
        enqueue=[{"train.amp.policy": "off", "model.render.samples_per_ray": 4},
                 {"train.amp.policy": "generator", "model.render.samples_per_ray": 4},
                 {"train.amp.policy": "off", "model.render.samples_per_ray": 50000}])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [sys.executable, "-m", "grafccsr.sweep", str(study), "--storage", f"sqlite:///{tmp_path}/optuna.db",
            "--tracking-uri", uri, "--runs-root", str(tmp_path / "runs"), "train.batch_size=1", "--workers", "2"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Pareto front" in out.stdout and out.stdout.count("] start") == 3
    import optuna

    trials = optuna.load_study(study_name="real", storage=f"sqlite:///{tmp_path}/optuna.db").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL"], [t.user_attrs for t in trials]
    assert trials[2].user_attrs["failure_reason"] == "oom"
    for t in trials[:2]:
        assert all(math.isfinite(v) for v in t.values)
        assert t.values[0] == t.user_attrs["peak_memory_mb"] and t.values[1] == t.user_attrs["fid_rf"]

    client = MlflowClient(uri)
    parents = client.search_runs([client.get_experiment_by_name("sweep-real").experiment_id],
                                 filter_string="tags.sweep_study = 'real'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.params["sampler"] == "grid" and json.loads(parent.data.params["search_space"])
    for t in trials:
        child = client.get_run(t.user_attrs["mlflow_run_id"])
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["optuna_trial_number"] == str(t.number)
    oom_child = client.get_run(trials[2].user_attrs["mlflow_run_id"])
    assert oom_child.info.status == "FAILED" and oom_child.data.tags["failure_reason"] == "oom"

    expected = brute_force_front(trials, ["minimize", "minimize"])
    pareto = json.loads(Path(client.download_artifacts(parent.info.run_id, "pareto.json", str(tmp_path))).read_text())
    assert {row["trial"] for row in pareto["pareto"]} == expected
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"pareto.json", "pareto.png", "trials.json", "pareto_tables"} <= artifacts

    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "] start" not in again.stdout and parent.info.run_id in again.stdout
    assert len(client.search_runs([parent.info.experiment_id], filter_string="tags.sweep_study = 'real'")) == 1


# --------------------------------------------------------------------------- real servers: PostgreSQL + mlflow server


def _sweep_cli(study, storage, tracking_uri, runs_root, *extra, env=None):
    return subprocess.Popen([sys.executable, "-m", "grafccsr.sweep", str(study), "--storage", storage,
                             "--tracking-uri", tracking_uri, "--runs-root", str(runs_root), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _children(client, study_name):
    """(parent runs, child runs) of a study in the MLflow server."""
    experiment = client.get_experiment_by_name(f"sweep-{study_name}")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.optuna_study = '{study_name}'")
    parents = client.search_runs([experiment.experiment_id],
                                 filter_string=f"tags.sweep_study = '{study_name}' and tags.sweep_role = 'parent'")
    return parents, runs


def test_two_sweep_processes_share_one_postgres_study(tmp_path, fake_trainer, pg_storage, services):
    """Two sweep processes (2 workers each) started together on a fresh PostgreSQL database:
    the schema is created once, the study has exactly n_trials trials with distinct numbers, each
    launched once, and every child run hangs under the study's one MLflow parent run."""
    import optuna
    from mlflow.tracking import MlflowClient

    name = f"pg2-{uuid.uuid4().hex[:6]}"
    study = write_study(tmp_path, name=name, sampler="random", n_trials=6, trainer_cmd=fake_trainer,
                        heartbeat_interval_s=5,
                        search_space={"train.batch_size": {"type": "categorical", "choices": [1, 2, 4, 8]},
                                      "model.render.samples_per_ray": {"type": "int", "low": 4, "high": 64}})
    log = tmp_path / "launches.jsonl"
    env = dict(os.environ, FAKE_TRAINER_SLEEP="0.5", FAKE_TRAINER_LOG=str(log))
    procs = [_sweep_cli(study, pg_storage, services.tracking_uri, tmp_path / "runs", "--workers", "2", env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n\n".join(outs)
    trials = optuna.load_study(study_name=name, storage=pg_storage).trials
    assert sorted(t.number for t in trials) == list(range(6)), [(t.number, t.state) for t in trials]
    assert all(t.state.name == "COMPLETE" for t in trials)
    run_dirs = [a for line in log.read_text().splitlines() for a in json.loads(line) if a.startswith("hydra.run.dir=")]
    assert len(run_dirs) == 6 == len(set(run_dirs))
    assert sum(o.count("] start") for o in outs) == 6
    client = MlflowClient(services.tracking_uri)
    parents, children = _children(client, name)
    assert len(parents) == 1
    parent = parents[0].info.run_id
    assert parents[0].info.status == "FINISHED"  # ended by whichever process finished last
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in children}
    assert all(r.data.tags["mlflow.parentRunId"] == parent and r.data.tags["launcher"] == "local" for r in children)
    assert optuna.load_study(study_name=name, storage=pg_storage).user_attrs["mlflow_parent_run_id"] == parent


@pytest.mark.slow  # long end to end; `make test-slow`
def test_sigkill_worker_trial_is_failed_retried_and_its_run_closed(tmp_path, fake_trainer, pg_storage, services):
    """One of two sweep processes is SIGKILLed while its trial runs: its trainer dies with it, the
    survivor fails the trial once its heartbeat is older than grace_period_s, runs it again, ends
    its MLflow run FAILED (worker_lost), and the study still gets n_trials counted trials."""
    import optuna
    from mlflow.tracking import MlflowClient

    from grafccsr.services.local import pid_alive
    from grafccsr.sweeping.driver import counts_toward_total

    name = f"hb-{uuid.uuid4().hex[:6]}"
    study = write_study(tmp_path, name=name, sampler="random", n_trials=3, trainer_cmd=fake_trainer,
                        heartbeat_interval_s=1, grace_period_s=4)
    env = dict(os.environ, FAKE_TRAINER_SLEEP="3")
    victim = _sweep_cli(study, pg_storage, services.tracking_uri, tmp_path / "runs-a", env=env)
    client = MlflowClient(services.tracking_uri)
    head = []
    for line in victim.stdout:  # wait until it runs a trial
        head.append(line)
        if "] start" in line:
            break
    number = int(head[-1].split("[trial ", 1)[1].split("]")[0])
    survivor = _sweep_cli(study, pg_storage, services.tracking_uri, tmp_path / "runs-b", env=env)
    deadline = time.time() + 30
    while time.time() < deadline and not _children(client, name)[1]:
        time.sleep(0.2)  # the victim's trainer has made its MLflow run
    victim.kill()
    victim.communicate(timeout=30)
    out = survivor.communicate(timeout=180)[0]
    assert survivor.returncode == 0, out
    assert "FAIL(worker_lost)" in out

    trials = optuna.load_study(study_name=name, storage=pg_storage).trials
    dead = trials[number]
    assert dead.state.name == "FAIL" and "failure_reason" not in dead.user_attrs
    assert not pid_alive(dead.user_attrs["pid"])  # the trainer did not outlive its sweep process
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == number]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE" and retries[0].params == dead.params
    assert retries[0].user_attrs["retry_reason"] == "worker_lost" and retries[0].user_attrs["retry_of"] == number
    assert sum(counts_toward_total(t) for t in trials) == 3 and len(trials) == 4
    assert sum(t.state.name == "COMPLETE" for t in trials) == 3
    assert len({t.number for t in trials}) == len(trials)
    _, runs = _children(client, name)
    lost = [r for r in runs if r.data.tags.get("optuna_trial_number") == str(number)]
    assert len(lost) == 1 and lost[0].info.status == "FAILED", [(r.info.status, r.data.tags) for r in lost]
    assert lost[0].data.tags["failure_reason"] == "worker_lost" and "heartbeat" in lost[0].data.tags["failure_message"]


def test_submitit_local_executor(tmp_path, fake_trainer, services):
    """launcher: submitit through submitit's local executor: one job per trial, the job id on the
    trial (user attribute) and on its MLflow run (tag), job logs in the submitit folder."""
    from mlflow.tracking import MlflowClient

    name = f"sub-{uuid.uuid4().hex[:6]}"
    study = write_study(tmp_path, name=name, n_trials=2, launcher="submitit",
                        submitit={"cluster": "local", "time_limit_min": 5})
    result, lines = run(study, tmp_path, fake_trainer, tracking_uri=services.tracking_uri)
    trials = result.study.trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"], [t.user_attrs for t in trials]
    client = MlflowClient(services.tracking_uri)
    for t in trials:
        attrs = t.user_attrs
        assert attrs["launcher"] == "submitit" and attrs["cluster"] == "local" and attrs["job_id"]
        assert (tmp_path / "runs" / "sweeps" / name / "submitit" / attrs["job_id"]).is_dir()
        tags = client.get_run(attrs["mlflow_run_id"]).data.tags
        assert tags["job_id"] == attrs["job_id"] and tags["launcher"] == "submitit" and tags["host"]
        assert tags["mlflow.parentRunId"] == result.parent_run_id
    assert sum("submitted as local job" in ln for ln in lines) == 2


@pytest.mark.slow  # long end to end; `make test-slow`
def test_torchrun_launcher_two_cpu_ranks(tmp_path, services):
    """launcher: torchrun, nproc_per_node 2: the real trainer on 2 CPU ranks (global batch 2),
    one MLflow run with world size 2 and the launcher/ranks/host tags."""
    import optuna
    from mlflow.tracking import MlflowClient

    name = f"tr-{uuid.uuid4().hex[:6]}"
    study = write_study(
        tmp_path, name=name, n_trials=1, launcher="torchrun", nproc_per_node=2,
        objectives=[{"metric": "peak_memory_mb", "direction": "minimize"}, {"metric": "fid_rf", "direction": "minimize"}],
        base_overrides=["+exp=smoke", "train.device=cpu", "train.batch_size=2", "train.max_iters=2",
                        "train.sample_every=0", "train.ckpt_every=0", "eval.num_samples=8", "eval.kid_subset_size=4",
                        "tracking.system_metrics=false"],
        search_space={"model.render.samples_per_ray": {"type": "categorical", "choices": [4]}})
    storage = f"sqlite:///{tmp_path}/optuna.db"
    out = subprocess.run([sys.executable, "-m", "grafccsr.sweep", str(study), "--storage", storage, "--tracking-uri",
                          services.tracking_uri, "--runs-root", str(tmp_path / "runs")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (trial,) = optuna.load_study(study_name=name, storage=storage).trials
    assert trial.state.name == "COMPLETE", trial.user_attrs
    assert trial.user_attrs["launcher"] == "torchrun" and trial.user_attrs["ranks"] == 2
    run = MlflowClient(services.tracking_uri).get_run(trial.user_attrs["mlflow_run_id"])
    assert run.data.tags["world_size"] == "2" and run.data.params["train.batch_size"] == "2"
    assert run.data.tags["launcher"] == "torchrun" and run.data.tags["ranks"] == "2" and run.data.tags["host"]
