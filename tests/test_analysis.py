"""analysis/: loading MLflow runs (typed), Pareto fronts, FID-extractor separation, the measured
memory-guide table, reports and plots. Synthetic runs are logged straight into a temporary MLflow
store; one real `+exp=smoke` training run proves the loader reads what training logs."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # analysis/ is a top-level folder, not part of the installed package
    sys.path.insert(0, str(ROOT))

from analysis import ablation, pareto, plots, report, runs  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def smoke_params():
    """The flattened `+exp=smoke` config as MLflow param strings, like a training run logs them."""
    from grafccsr.config import flatten, load_config

    return {k: str(v) for k, v in flatten(load_config(["+exp=smoke"])).items()}


@pytest.fixture(scope="module")
def empty_store_file(tmp_path_factory):
    """An initialised, empty MLflow SQLite file (creating the schema takes seconds; copying it does not)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, empty_store_file):
    """A throwaway MLflow store per test: (uri, client, tmp_path)."""
    import shutil

    from mlflow.tracking import MlflowClient

    shutil.copy(empty_store_file, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, MlflowClient(tracking_uri=uri), tmp_path


def experiment(store, name):
    uri, cl, tmp = store
    exp = cl.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return cl.create_experiment(name, artifact_location=(tmp / "mlartifacts").as_uri())


def log_run(store, exp_name, params=None, metrics=None, tags=None, status="FINISHED", histories=None,
            step=10):
    """One synthetic run: ``metrics`` logged at ``step``, ``histories`` as {key: [(step, value)]}."""
    from mlflow.entities import Metric, Param

    _, cl, _ = store
    run = cl.create_run(experiment(store, exp_name), tags={"device": "cpu", "fid_extractor": "random-features",
                                                           "failure_reason": "", **(tags or {})})
    rid = run.info.run_id
    now = int(time.time() * 1000)
    if params:
        cl.log_batch(rid, params=[Param(k, str(v)) for k, v in params.items()], synchronous=True)
    items = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()]
    for key, points in (histories or {}).items():
        items += [Metric(key, float(v), now + i, s) for i, (s, v) in enumerate(points)]
    if items:
        cl.log_batch(rid, metrics=items, synchronous=True)
    cl.set_terminated(rid, status=status)
    return rid


def cpu_metrics(peak, it_per_s=2.0, fid=50.0, kid=0.05, phases=None):
    phases = phases or {"d_step": peak * 0.9, "g_step": peak}
    out = {"mem/peak_live_tensors_mb": peak, "perf/it_per_s": it_per_s, "eval/fid": fid, "eval/kid_mean": kid,
           "eval/kid_std": kid / 10, "mem/process_peak_rss_mb": 1000.0, "loss/d": 1.0, "loss/g": 2.0}
    out.update({f"mem/{p}/peak_live_tensors_mb": v for p, v in phases.items()})
    return out


def is_png(path):
    path = Path(path)
    return path.is_file() and path.stat().st_size > 100 and path.read_bytes()[:8] == PNG


# ----------------------------------------------------------------------------- loading and typing


def test_type_column_per_column_kinds():
    t = runs.type_column
    assert str(t(pd.Series(["8", "16", "None"])).dtype) == "Int64"
    assert t(pd.Series(["8", "16", "None"])).isna().tolist() == [False, False, True]
    assert t(pd.Series(["8", "0.5"])).dtype == np.float64          # int next to float -> float
    assert t(pd.Series(["1e-08", "0.0006"])).tolist() == [1e-08, 0.0006]
    assert str(t(pd.Series(["True", "False"])).dtype) == "boolean"
    mixed = t(pd.Series(["off", "1", "None"]))                     # mixed kinds stay strings
    assert mixed.dtype == object and mixed.tolist() == ["off", "1", None]
    assert t(pd.Series(["[0.0, 0.99]"])).tolist() == ["[0.0, 0.99]"]
    assert runs.coerce_value("None") is None and runs.coerce_value("-1") == -1


def test_loader_types_filters_and_history(store, smoke_params):
    uri, cl, _ = store
    a = log_run(store, "exp-a", {**smoke_params, "train.batch_size": "4", "train.amp.policy": "generator"},
                {k: v for k, v in cpu_metrics(12.5).items() if k != "eval/fid"}, tags={"exp": "smoke", "sweep_x": "yes"},
                histories={"eval/fid": [(5, 80.0), (10, 60.0), (2, 90.0)]})
    b = log_run(store, "exp-a", smoke_params, {}, tags={"failure_reason": "oom"}, status="FAILED")
    log_run(store, "exp-b", smoke_params, cpu_metrics(3.0))
    df = runs.load_runs(uri, experiments=["exp-a"])
    assert set(df["run_id"]) == {a, b}
    assert pd.api.types.is_integer_dtype(df["params.train.batch_size"])
    assert pd.api.types.is_integer_dtype(df["batch_size"]) and pd.api.types.is_integer_dtype(df["samples_per_ray"])
    assert pd.api.types.is_bool_dtype(df["params.memory.set_to_none"])
    assert pd.api.types.is_float_dtype(df["params.train.lr_g"])
    assert df["params.eval.weights_path"].isna().all()             # "None" -> missing
    assert pd.api.types.is_float_dtype(df["metrics.eval/fid"]) and pd.api.types.is_float_dtype(df["fid"])
    assert pd.api.types.is_datetime64_any_dtype(df["start_time"])
    ra, rb = df.set_index("run_id").loc[a], df.set_index("run_id").loc[b]
    assert ra["batch_size"] == 4 and ra["status"] == "FINISHED" and ra["tags.exp"] == "smoke"
    assert ra["amp"] == True and ra["amp_policy"] == "generator"  # noqa: E712 - pandas boolean
    assert ra["peak_memory_mb"] == 12.5 and ra["peak_memory_measure"] == "peak_live_tensors"
    assert ra["fid"] == 60.0                                       # latest value (highest step)
    assert ra["failure_reason"] is None and rb["failure_reason"] == "oom" and rb["status"] == "FAILED"
    assert math.isnan(rb["fid"])
    # tag filter, all experiments
    assert runs.load_runs(uri, tags={"sweep_x": "yes"})["run_id"].tolist() == [a]
    assert len(runs.load_runs(uri)) == 3
    hist = runs.metric_history(a, "eval/fid", uri)
    assert hist["step"].tolist() == [2, 5, 10] and hist["value"].tolist() == [90.0, 80.0, 60.0]
    long = runs.metric_histories([a, b], ["eval/fid"], uri)
    assert set(long["run_id"]) == {a} and len(long) == 3


def test_cuda_runs_use_reserved_memory(store, smoke_params):
    uri, _, _ = store
    log_run(store, "gpu", smoke_params, {"mem/peak_allocated_mb": 900.0, "mem/peak_reserved_mb": 1024.0,
                                         "mem/peak_live_tensors_mb": 880.0, "eval/fid": 10.0},
            tags={"device": "NVIDIA H100 80GB HBM3"})
    row = runs.load_runs(uri, experiments=["gpu"]).iloc[0]
    assert row["peak_memory_mb"] == 1024.0 and row["peak_memory_measure"] == "cuda_peak_reserved"
    assert row["peak_allocated_mb"] == 900.0


# ----------------------------------------------------------------------------- Pareto


def brute_force_front(points, directions):
    sign = [1 if d == "minimize" else -1 for d in directions]
    out = []
    for i, p in enumerate(points):
        if any(math.isnan(v) for v in p):
            out.append(False)
            continue
        dominated = False
        for j, q in enumerate(points):
            if i == j or any(math.isnan(v) for v in q):
                continue
            no_worse = all(s * qv <= s * pv for s, qv, pv in zip(sign, q, p))
            better = any(s * qv < s * pv for s, qv, pv in zip(sign, q, p))
            if no_worse and better:
                dominated = True
                break
        out.append(not dominated)
    return out


@pytest.mark.parametrize("k,directions", [(2, ("minimize", "minimize")), (2, ("minimize", "maximize")),
                                          (3, ("maximize", "minimize", "minimize"))])
def test_pareto_mask_matches_brute_force(k, directions):
    rng = np.random.default_rng(k * 7 + len(directions[0]))
    for trial in range(20):
        pts = np.round(rng.random((int(rng.integers(1, 40)), k)) * 5) / 5   # rounding makes ties
        if trial % 3 == 0:
            pts[rng.integers(0, len(pts))] = np.nan
        got = pareto.pareto_mask(pts, directions)
        assert got.tolist() == brute_force_front(pts.tolist(), directions)
    assert not pareto.pareto_mask(np.empty((0, 2))).any()


def test_pareto_front_statuses():
    df = pd.DataFrame({
        "run_id": list("abcdefg"),
        "status": ["FINISHED"] * 5 + ["FAILED", "FINISHED"],
        "peak_memory_mb": [1.0, 2.0, 3.0, 2.5, 0.5, 0.1, 4.0],
        "fid": [50.0, 40.0, 45.0, 30.0, 20.0, 1.0, float("nan")],
    })
    out = pareto.pareto_front(df, memory_budget_mb=2.4).set_index("run_id")
    # e (0.5 MB, 20) dominates a, b; d is over budget; f failed; g lacks FID; c is dominated and over budget
    assert out.loc["e", "pareto_status"] == "front" and out["on_front"].sum() == 1
    assert out.loc["a", "pareto_status"] == "dominated" and out.loc["b", "pareto_status"] == "dominated"
    assert out.loc["d", "pareto_status"] == "infeasible" and out.loc["c", "pareto_status"] == "infeasible"
    assert out.loc["f", "pareto_status"] == "failed" and out.loc["g", "pareto_status"] == "failed"
    no_budget = pareto.pareto_front(df).set_index("run_id")
    assert set(no_budget.index[no_budget["on_front"]]) == {"e"}
    assert pareto.pareto_front(df, directions=("minimize", "maximize")).set_index("run_id")["on_front"].sum() >= 2


# ----------------------------------------------------------------------------- extractors


def test_extractors_never_share_an_axis(tmp_path):
    df = pd.DataFrame({"run_id": ["a", "b", "c", "d"], "status": ["FINISHED"] * 4,
                       "fid": [10.0, 12.0, 3.0, float("nan")], "peak_memory_mb": [1.0, 2.0, 3.0, 4.0],
                       "peak_memory_measure": ["peak_live_tensors"] * 4, "device": ["cpu"] * 4,
                       "fid_extractor": ["random-features", "random-features", "inception-v3-compat", "x"]})
    with pytest.raises(runs.MixedExtractorsError):
        runs.require_one_extractor(df, "fid")
    with pytest.raises(runs.MixedExtractorsError):
        runs.quality(df, "fid")
    assert runs.quality(df, "fid", extractor="random-features").tolist() == [10.0, 12.0]
    parts = runs.split_by_extractor(df, "fid")
    assert set(parts) == {"random-features", "inception-v3-compat"}   # "x" has no FID: not a group
    assert runs.require_one_extractor(parts["random-features"]) == "random-features"
    groups = runs.comparable_groups(df)
    assert ("peak_live_tensors", "random-features") in groups and ("peak_live_tensors", "inception-v3-compat") in groups
    assert is_png(plots.plot_memory_vs_quality(df, tmp_path / "mixed.png")) # one panel per extractor
    hist = pd.DataFrame({"run_id": ["a", "c"], "key": ["eval/fid"] * 2, "step": [1, 1], "value": [1.0, 2.0]})
    with pytest.raises(runs.MixedExtractorsError):
        plots.plot_curves(hist, tmp_path / "curves.png", runs=df)


# ----------------------------------------------------------------------------- ablation table


def _ablation_runs(store, smoke_params, device="cpu"):
    """Two batches; the latest has baseline, 3 (no change), 11 (-40 %), 6+7, all, a failed 9
    and item 10 evaluated with another extractor."""
    old = {"ablation_batch": "old"}
    log_run(store, "abl", smoke_params, cpu_metrics(999.0), tags={**old, "ablation_item": "baseline"})
    new = {"ablation_batch": "new", "device": device}
    spec = {"baseline": (10.0, 2.0, 50.0), "3": (10.0, 2.1, 52.0), "11": (6.0, 0.5, 55.0),
            "6+7": (8.5, 1.9, 49.0), "all": (3.5, 0.4, 70.0), "10": (10.0, 2.0, 5.0)}
    spec["ckpt"] = (5.0, 1.0, 50.0)
    spec["rerun"] = (10.0, 2.5, 50.0)   # the baseline again: +25 % it/s is run-to-run noise
    for key, (peak, its, fid) in spec.items():
        tags = {**new, "ablation_item": key, "ablation_code": "bbb" if key == "ckpt" else "aaa"}
        if key == "10":
            tags["fid_extractor"] = "inception-v3-compat"
        metrics = cpu_metrics(peak, its, fid)
        if device != "cpu":
            metrics.update({"mem/peak_allocated_mb": peak * 100, "mem/peak_reserved_mb": peak * 120})
        log_run(store, "abl", smoke_params, metrics, tags=tags)
    log_run(store, "abl", smoke_params, {}, tags={**new, "ablation_item": "9", "failure_reason": "oom"},
            status="FAILED")


def test_ablation_table_arithmetic(store, smoke_params):
    uri, _, _ = store
    _ablation_runs(store, smoke_params)
    df = ablation.load_ablation("abl", uri)
    full = ablation.ablation_table(df)
    table = full.set_index("key")   # latest batch: the "old" baseline is ignored
    assert table.attrs["device"] == "cpu" and table.attrs["batch"] == "new"
    assert table.loc["baseline", "peak_live_tensors_mb"] == 10.0
    assert table.loc["3", "peak_live_tensors_mb_change_pct"] == pytest.approx(0.0)
    assert table.loc["11", "peak_live_tensors_mb_change_pct"] == pytest.approx((6.0 - 10.0) / 10.0 * 100)
    assert table.loc["11", "it_per_s_change_pct"] == pytest.approx((0.5 - 2.0) / 2.0 * 100)
    assert table.loc["6+7", "peak_live_tensors_mb_change_pct"] == pytest.approx(-15.0)
    assert table.loc["all", "fid_change_pct"] == pytest.approx((70.0 - 50.0) / 50.0 * 100)
    assert table.loc["3", "fid_change_pct"] == pytest.approx(4.0)
    # another extractor: value shown, change not computed
    assert table.loc["10", "fid"] == 5.0 and pd.isna(table.loc["10", "fid_change_pct"])
    assert not table.loc["10", "quality_comparable"] and "extractor" in table.loc["10", "note"]
    # claims from the guide, and rows without a toggle or a finished run
    assert table.loc["3", "claim"] == "5–10 %" and table.loc["3", "claim_low_pct"] == 5.0
    assert table.loc["11", "claim_high_pct"] == 50.0 and table.loc["all", "claim"].startswith("60–90 %")
    assert table.loc["1", "status"] == "no toggle" and table.loc["4", "status"] == "no toggle"
    assert table.loc["9", "status"].startswith("FAILED") and "oom" in table.loc["9", "status"]
    assert table.loc["chunk", "status"] == "not run"
    # made with other code than the baseline (working tree edited mid-batch): value kept, no change computed
    assert table.loc["ckpt", "peak_live_tensors_mb"] == 5.0 and pd.isna(table.loc["ckpt", "peak_live_tensors_mb_change_pct"])
    assert "fingerprint bbb vs aaa" in table.loc["ckpt", "note"]
    assert ablation.pct_change(3.0, 0.0) is None and ablation.pct_change(None, 1.0) is None
    md = ablation.table_markdown(full)
    assert "peak live tensors MiB (Δ %)" in md and "10.00 (+0.0 %)" in md and "6.00 (-40.0 %)" in md
    texts = ablation.findings(full)
    joined = "\n".join(texts)
    assert "#3 zero_grad(set_to_none) (memory.set_to_none=true) changed peak live tensors by +0.0 %" in joined
    assert "claimed a saving of 5–10 %: the measured saving, 0.0 %, is below that" in joined
    assert "claimed a saving of 30–50 %" in joined and "the measured saving, 40.0 %, is within that" in joined
    assert "#1 no global CUDA tensor type: not measured" in joined
    assert "did not finish" in joined and "made with other code than the baseline" in joined
    assert "iterations/s +5.0 % (within the ±25.0 % run-to-run variation)" in joined     # item 3
    assert "iterations/s -75.0 %;" in joined                                             # item 11: beyond it


def test_ablation_table_cuda_columns(store, smoke_params):
    uri, _, _ = store
    _ablation_runs(store, smoke_params, device="NVIDIA H100 80GB HBM3")
    table = ablation.ablation_table(ablation.load_ablation("abl", uri))
    assert ablation.headline_measure(table) == "peak_allocated_mb"
    row = table.set_index("key").loc["11"]
    assert row["peak_allocated_mb_change_pct"] == pytest.approx(-40.0)
    assert row["peak_reserved_mb_change_pct"] == pytest.approx(-40.0)
    md = ablation.table_markdown(table)
    assert "peak CUDA allocated MiB" in md and "peak CUDA reserved MiB" in md
    assert "NVIDIA H100" in ablation.table_header(table)


def test_ablation_cli_with_fake_runner(store, tmp_path):
    """The CLI builds valid training commands (composed here with Hydra), tags the runs, and
    writes the report from them."""
    from grafccsr.config import flatten, load_config

    uri, cl, _ = store
    calls = []

    def fake_runner(cmd, log_path, timeout_s, cwd=None):
        calls.append(cmd)
        assert (Path(cwd) / "grafccsr" / "train.py").is_file() and (Path(cwd) / "conf" / "config.yaml").is_file()
        assert cmd[1:3] == ["-m", "grafccsr.train"]
        overrides = [c for c in cmd[3:] if not c.startswith(("hydra.", "tracking.uri="))]
        cfg = load_config(overrides)                       # the command composes and validates
        tags = dict(cfg.tracking.tags)
        peak = 10.0 - 1.0 * cfg.memory.set_to_none - 4.0 * (cfg.train.amp.policy != "off")
        params = {k: str(v) for k, v in flatten(cfg).items()}
        log_run(store, cfg.tracking.experiment, params, cpu_metrics(peak), tags={**tags, "exp": cfg.exp_name})
        return 0

    out = tmp_path / "reports"
    code = ablation.main(["--tracking-uri", uri, "--items", "3,11", "--runs-root", str(tmp_path / "runs"),
                          "--out", str(out), "--iters", "3", "train.batch_size=1"], runner=fake_runner)
    assert code == 0 and len(calls) == 3
    joined = [" ".join(c) for c in calls]
    assert all("+exp=[smoke,baseline_fp32]" in c and "model.ccsr.mode=regularizer" in c for c in joined)
    assert all("train.max_iters=3" in c and c.index("train.max_iters=3") < c.index("train.batch_size=1")
               for c in joined)
    assert "++tracking.tags.ablation_item=11" in joined[2] and "train.amp.dtype=bf16" in joined[2]
    assert all(re.search(r"\+\+tracking\.tags\.ablation_code=[0-9a-f]{12}$", c) for c in joined)
    df = ablation.load_ablation("ablation-cpu", uri)
    assert sorted(df["tags.ablation_item"]) == ["11", "3", "baseline"]
    assert set(df["batch_size"]) == {1} and set(df["ccsr_mode"]) == {"regularizer"}
    folder = out / "ablation-cpu"
    text = (folder / "report.md").read_text()
    assert "5–10 %" in text and "-40.0 %" in text and "Device: **cpu**" in text
    for png in ("ablation_changes.png", "memory_per_phase.png", "throughput_changes.png"):
        assert is_png(folder / png), png
    assert "data:image/png;base64," in (folder / "report.html").read_text()
    rep = runs.load_runs(uri, experiments=["ablation-cpu"], include_reports=True)
    assert (rep["tags.analysis_report"] == "true").sum() == 1          # logged, and skipped by default
    assert len(runs.load_runs(uri, experiments=["ablation-cpu"])) == 3
    # --dry-run prints, runs nothing
    assert ablation.main(["--dry-run", "--preset", "gpu", "--items", "chunk"], runner=fake_runner) == 0
    assert len(calls) == 3


# ----------------------------------------------------------------------------- sweep report


def test_sweep_report_joins_trials_and_writes_files(store, smoke_params, tmp_path):
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    uri, cl, _ = store
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="mq", storage=storage, directions=["minimize", "minimize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental API
        study.set_metric_names(["peak_memory_mb", "fid"])
    exp_id = experiment(store, "sweep-mq")
    parent = cl.create_run(exp_id, tags={"sweep_study": "mq", "sweep_role": "parent"}).info.run_id
    cl.log_param(parent, "objectives", json.dumps([{"metric": "peak_memory_mb", "direction": "minimize"},
                                                  {"metric": "fid", "direction": "minimize"}]))
    dist = {"train.batch_size": CategoricalDistribution([1, 2, 4]),
            "model.render.samples_per_ray": CategoricalDistribution([4, 8])}
    points = [(1, 4, 3.0, 60.0), (2, 4, 5.0, 50.0), (4, 8, 9.0, 55.0), (2, 8, 6.0, 40.0), (4, 4, 12.0, 30.0)]
    for n, (bs, spr, mem, fid) in enumerate(points):
        params = {**smoke_params, "train.batch_size": str(bs), "model.render.samples_per_ray": str(spr)}
        rid = log_run(store, "sweep-mq", params, cpu_metrics(mem, fid=fid),
                      tags={"mlflow.parentRunId": parent, "optuna_trial_number": str(n)},
                      histories={"eval/fid": [(5, fid + 10), (10, fid)]})
        study.add_trial(create_trial(params={"train.batch_size": bs, "model.render.samples_per_ray": spr},
                                     distributions=dist, values=[mem, fid], user_attrs={"mlflow_run_id": rid},
                                     constraints={"memory_budget_mb": mem - 10.0}))
    failed = log_run(store, "sweep-mq", {**smoke_params, "train.batch_size": "4"}, {},
                     tags={"mlflow.parentRunId": parent, "failure_reason": "oom"}, status="FAILED")
    study.add_trial(create_trial(state=TrialState.FAIL, params={"train.batch_size": 4, "model.render.samples_per_ray": 8},
                                 distributions=dist, user_attrs={"mlflow_run_id": failed, "failure_reason": "oom"}))
    df = runs.load_sweep("mq", uri, storage)
    assert len(df) == 6 and df["trial_number"].tolist() == list(range(6))
    assert df.attrs["parent_run_id"] == parent
    assert pd.api.types.is_integer_dtype(df["batch_size"])
    assert df.set_index("trial_number").loc[5, "failure_reason"] == "oom"
    assert df["trial_feasible"].tolist()[:5] == [True, True, True, True, False]

    rep = report.write_report("mq", uri=uri, storage=storage, out=tmp_path / "reports", quiet=True)
    assert rep.kind == "sweep"
    front = pd.read_csv(tmp_path / "reports" / "mq" / "pareto_front.csv")
    # trial 4 (12 MB) is infeasible; of the rest, 0 (3 MB), 1 (5 MB) and 3 (6 MB, FID 40) are the front
    assert sorted(front["trial"]) == [0, 1, 3]
    folder = tmp_path / "reports" / "mq"
    assert (folder / "report.md").stat().st_size > 0 and (folder / "report.html").stat().st_size > 0
    for png in ("pareto.png", "memory_vs_batch.png", "throughput_vs_memory.png", "memory_per_phase.png"):
        assert is_png(folder / png), png
    assert list(folder.glob("curves_*.png")) and all(is_png(p) for p in folder.glob("curves_*.png"))
    logged = {f.path for f in cl.list_artifacts(parent, "report")}
    assert "report/report.md" in logged and "report/pareto.png" in logged
    text = (folder / "report.md").read_text()
    assert "![pareto](pareto.png)" in text and "Failures by reason: oom ×1" in text


def test_report_unknown_name(store, tmp_path):
    uri, _, _ = store
    assert report.main(["--name", "nope", "--tracking-uri", uri, "--storage", f"sqlite:///{tmp_path}/none.db",
                        "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "none.db").exists()                      # looking never creates a storage


# ----------------------------------------------------------------------------- one real training run


def test_real_smoke_run_loads_and_reports(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "grafccsr.train", "+exp=smoke", "train.device=cpu",
                           f"tracking.uri={uri}", "tracking.experiment=real", f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    df = runs.load_runs(uri, experiments=["real"])
    assert len(df) == 1
    row = df.iloc[0]
    assert row["run_id"] == summary["mlflow_run_id"] and row["status"] == "FINISHED"
    assert pd.api.types.is_integer_dtype(df["batch_size"]) and row["batch_size"] == 2
    assert pd.api.types.is_bool_dtype(df["params.memory.eager_free"])
    assert pd.api.types.is_float_dtype(df["params.train.lr_d"])
    assert row["device"] == "cpu" and row["fid_extractor"] == summary["fid_extractor"]
    assert row["fid"] == pytest.approx(summary["eval"]["fid"])
    assert row["peak_memory_mb"] == pytest.approx(summary["peak_memory_mb"])
    assert row["peak_memory_measure"] == summary["peak_memory_measure"]
    assert row["iterations"] == summary["iteration"] == 4
    assert runs.metric_history(row["run_id"], "loss/d", uri)["step"].tolist() == [1, 2, 3, 4]
    rep = report.write_report("real", uri=uri, out=tmp_path / "reports", quiet=True)
    assert rep.kind == "experiment"
    for png in rep.images:
        assert is_png(png), png
    assert re.search(r"\| random-features \|", (tmp_path / "reports" / "real" / "report.md").read_text())


# ----------------------------------------------------------------------------- slow: two real ablation runs


@pytest.mark.slow
def test_two_real_ablation_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = ablation.main(["--tracking-uri", uri, "--items", "3", "--iters", "3", "--runs-root", str(tmp_path / "runs"),
                          "--out", str(tmp_path / "reports"), "--experiment", "abl-slow"])
    assert code == 0
    table = ablation.ablation_table(ablation.load_ablation("abl-slow", uri)).set_index("key")
    assert table.loc["baseline", "status"] == "FINISHED" and table.loc["3", "status"] == "FINISHED"
    base, item = table.loc["baseline", "peak_live_tensors_mb"], table.loc["3", "peak_live_tensors_mb"]
    assert table.loc["3", "peak_live_tensors_mb_change_pct"] == pytest.approx((item - base) / base * 100)
    assert is_png(tmp_path / "reports" / "abl-slow" / "ablation_changes.png")


def test_plots_readable_labels(tmp_path):
    """Titles name the device, axes carry units (checked on the figure objects)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame({"run_id": ["a", "b", "c", "d"], "run_name": list("abcd"), "status": ["FINISHED"] * 3 + ["FAILED"],
                       "batch_size": [2, 4, 2, 8], "samples_per_ray": [8, 8, 16, 8], "amp": [False, False, True, False],
                       "peak_memory_mb": [1.0, 2.0, 1.5, float("nan")], "it_per_s": [3.0, 2.0, 1.0, float("nan")],
                       "peak_memory_measure": ["peak_live_tensors"] * 3 + [None], "device": ["cpu"] * 4,
                       "failure_reason": [None, None, None, "oom"], "fid": [1.0, 2.0, 3.0, float("nan")],
                       "fid_extractor": ["random-features"] * 4})
    seen = []
    orig = plt.Figure.savefig

    def spy(fig, *a, **k):
        for ax in fig.axes:
            seen.append((ax.get_title(), ax.get_xlabel(), ax.get_ylabel()))
        return orig(fig, *a, **k)

    plt.Figure.savefig = spy
    try:
        paths = [plots.plot_memory_vs_batch(df, tmp_path / "b.png"), plots.plot_throughput_vs_memory(df, tmp_path / "t.png"),
                 plots.plot_memory_vs_quality(df, tmp_path / "q.png")]
    finally:
        plt.Figure.savefig = orig
    assert all(is_png(p) for p in paths)
    for title, xlabel, ylabel in seen:
        assert "device: cpu" in title and xlabel and ylabel
    assert any("MiB" in x for _, x, _ in seen) and any("batch size" in x for _, x, _ in seen)
    assert any("it/s" in y for _, _, y in seen)


def test_package_imports_lightly():
    code = "import sys, analysis; assert 'mlflow' not in sys.modules and 'matplotlib' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0



def test_gpu_preset_commands_compose():
    """The GPU preset's commands are valid configs (composed and validated without a GPU)."""
    from grafccsr.config import load_config

    preset = ablation.PRESETS["gpu"]
    plan = ablation.AblationPlan(preset, preset.iters, "x", "sqlite:////nonexistent/x.db", "b", Path("/tmp/r"),
                                 ablation.select_items("11,all"))
    got = {}
    for item, cmd, _ in plan.commands:
        cfg = load_config([c for c in cmd[3:] if not c.startswith("hydra.")])
        got[item.key] = cfg
        assert cfg.train.device == "cuda" and cfg.train.batch_size == 8 and cfg.model.patch.rays_per_patch == 4096
        assert cfg.model.ccsr.mode == "regularizer" and cfg.tracking.tags["ablation_item"] == item.key
    assert not got["baseline"].memory.set_to_none and got["baseline"].train.amp.policy == "off"
    assert (got["11"].train.amp.policy, got["11"].train.amp.dtype) == ("all", "fp16")
    assert got["all"].exp_name == "seed_all" and got["all"].memory.ccsr_no_grad
