"""analysis/: loading MLflow runs (typed), Pareto fronts, extractor-specific quality columns, the
measured memory-guide table, reports and plots. Synthetic runs are logged straight into a temporary
MLflow store; one real `+exp=smoke` training run proves the loader reads what training logs."""

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

from analysis import pareto, plots, report, runs, studies  # noqa: E402
from analysis.ablation import items, launch, table as abl  # noqa: E402

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


def cpu_metrics(peak, it_per_s=2.0, fid=50.0, kid=0.05, phases=None, suffix="_rf"):
    """Metrics of a CPU run; FID/KID named as the random-feature extractor logs them
    (``suffix=""``: as Inception does)."""
    phases = phases or {"d_step": peak * 0.9, "g_step": peak}
    out = {"mem/peak_live_tensors_mb": peak, "perf/it_per_s": it_per_s, f"eval/fid{suffix}": fid,
           f"eval/kid{suffix}_mean": kid, f"eval/kid{suffix}_std": kid / 10, "mem/process_peak_rss_mb": 1000.0,
           "train/loss_d": 1.0, "train/loss_g": 2.0}
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
                {k: v for k, v in cpu_metrics(12.5).items() if k != "eval/fid_rf"}, tags={"exp": "smoke", "sweep_x": "yes"},
                histories={"eval/fid_rf": [(5, 80.0), (10, 60.0), (2, 90.0)],
                           "system/cpu_utilization_percentage": [(999, 50.0)]})   # a sample count, not an iteration
    b = log_run(store, "exp-a", smoke_params, {}, tags={"failure_reason": "oom"}, status="FAILED")
    log_run(store, "exp-b", smoke_params, cpu_metrics(3.0))
    df = runs.load_runs(uri, experiments=["exp-a"])
    assert set(df["run_id"]) == {a, b}
    assert pd.api.types.is_integer_dtype(df["params.train.batch_size"])
    assert pd.api.types.is_integer_dtype(df["batch_size"]) and pd.api.types.is_integer_dtype(df["samples_per_ray"])
    assert pd.api.types.is_bool_dtype(df["params.memory.set_to_none"])
    assert pd.api.types.is_float_dtype(df["params.train.lr_g"])
    assert df["params.eval.weights_path"].isna().all()             # "None" -> missing
    assert pd.api.types.is_float_dtype(df["metrics.eval/fid_rf"]) and pd.api.types.is_float_dtype(df["fid_rf"])
    assert pd.api.types.is_datetime64_any_dtype(df["start_time"])
    ra, rb = df.set_index("run_id").loc[a], df.set_index("run_id").loc[b]
    assert ra["batch_size"] == 4 and ra["status"] == "FINISHED" and ra["tags.exp"] == "smoke"
    assert ra["amp"] == True and ra["amp_policy"] == "generator"  # noqa: E712 - pandas boolean
    assert ra["peak_memory_mb"] == 12.5 and ra["peak_memory_measure"] == "peak_live_tensors"
    assert ra["fid_rf"] == 60.0 and math.isnan(ra["fid"])        # latest value (highest step), its extractor's column
    assert ra["iterations"] == 10                                  # system/* steps are not iterations
    assert ra["timed_iterations"] == 10 - 6                        # smoke: live tensors tracked at 0, 1, 2, 4, 6, 8
    assert ra["failure_reason"] is None and rb["failure_reason"] == "oom" and rb["status"] == "FAILED"
    assert math.isnan(rb["fid_rf"])
    # tag filter, all experiments
    assert runs.load_runs(uri, tags={"sweep_x": "yes"})["run_id"].tolist() == [a]
    assert len(runs.load_runs(uri)) == 3
    hist = runs.metric_history(a, "eval/fid_rf", uri)
    assert hist["step"].tolist() == [2, 5, 10] and hist["value"].tolist() == [90.0, 80.0, 60.0]
    long = runs.metric_histories([a, b], ["eval/fid_rf"], uri)
    assert set(long["run_id"]) == {a} and len(long) == 3


def test_cuda_runs_use_reserved_memory(store, smoke_params):
    uri, _, _ = store
    log_run(store, "gpu", smoke_params, {"mem/peak_allocated_mb": 900.0, "mem/peak_reserved_mb": 1024.0,
                                         "mem/peak_live_tensors_mb": 880.0, "eval/fid": 10.0},
            tags={"device": "NVIDIA H100 80GB HBM3", "fid_extractor": "inception-v3-compat"})
    row = runs.load_runs(uri, experiments=["gpu"]).iloc[0]
    assert row["peak_memory_mb"] == 1024.0 and row["peak_memory_measure"] == "cuda_peak_reserved"
    assert row["peak_allocated_mb"] == 900.0 and row["fid"] == 10.0 and math.isnan(row["fid_rf"])


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
    objectives = ("peak_memory_mb", "fid")
    out = pareto.pareto_front(df, objectives, memory_budget_mb=2.4).set_index("run_id")
    # e (0.5 MB, 20) dominates a, b; d is over budget; f failed; g lacks FID; c is dominated and over budget
    assert out.loc["e", "pareto_status"] == "front" and out["on_front"].sum() == 1
    assert out.loc["a", "pareto_status"] == "dominated" and out.loc["b", "pareto_status"] == "dominated"
    assert out.loc["d", "pareto_status"] == "infeasible" and out.loc["c", "pareto_status"] == "infeasible"
    assert out.loc["f", "pareto_status"] == "failed" and out.loc["g", "pareto_status"] == "failed"
    no_budget = pareto.pareto_front(df, objectives).set_index("run_id")
    assert set(no_budget.index[no_budget["on_front"]]) == {"e"}
    assert pareto.pareto_front(df, objectives, ("minimize", "maximize")).set_index("run_id")["on_front"].sum() >= 2


# ----------------------------------------------------------------------------- extractors


def test_each_extractor_has_its_own_columns(store, smoke_params, tmp_path):
    """Random-feature and Inception numbers land in different columns (a legacy run that logged
    random-feature values as eval/fid included); a quality plot shows one column, labelled."""
    uri, _, _ = store
    rf = log_run(store, "q", smoke_params, cpu_metrics(1.0, fid=10.0))
    inc = log_run(store, "q", smoke_params, cpu_metrics(2.0, fid=3.0, suffix=""),
                  tags={"fid_extractor": "inception-v3-compat"})
    legacy = log_run(store, "q", smoke_params, cpu_metrics(3.0, fid=12.0, suffix=""))   # tag says random-features
    df = runs.load_runs(uri, experiments=["q"]).set_index("run_id")
    assert df.loc[rf, "fid_rf"] == 10.0 and math.isnan(df.loc[rf, "fid"])
    assert df.loc[inc, "fid"] == 3.0 and df.loc[inc, "kid_mean"] == 0.05 and math.isnan(df.loc[inc, "fid_rf"])
    assert df.loc[legacy, "fid_rf"] == 12.0 and df.loc[legacy, "kid_rf_mean"] == 0.05 and math.isnan(df.loc[legacy, "fid"])
    assert df.loc[inc, "fid_extractor"] == "inception-v3-compat" and df.loc[rf, "fid_extractor"] == "random-features"
    assert runs.quality_present(df) == ["fid_rf", "fid"]
    assert runs.extractor_of("kid_rf_std") == "random-features" and runs.extractor_of("eval/fid") == "inception-v3-compat"
    assert runs.extractor_of("peak_memory_mb") is None
    assert runs.quality_label("fid_rf") == "FID (random features)" and runs.quality_label("fid") == "FID (Inception)"
    assert not hasattr(runs, "split_by_extractor") and not hasattr(runs, "MixedExtractorsError")   # nothing to split
    labels = []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    orig = plt.Figure.savefig

    def spy(fig, *a, **k):
        labels.extend((ax.get_ylabel(), len(ax.collections)) for ax in fig.axes)
        return orig(fig, *a, **k)

    plt.Figure.savefig = spy
    try:
        assert is_png(plots.plot_memory_vs_quality(df.reset_index(), tmp_path / "q.png", y="fid"))
    finally:
        plt.Figure.savefig = orig
    (ylabel, n_series), = labels
    assert ylabel.startswith("FID (Inception)") and n_series == 1             # the Inception run only


# ----------------------------------------------------------------------------- ablation table


def _ablation_runs(store, smoke_params, device="cpu"):
    """Two batches; the latest has baseline, 3 (no change), 11 (-40 %), 6+7, all, a failed 9
    and item 10 evaluated with another extractor. Every iteration is timed (no live-tensor tracking)."""
    smoke_params = {**smoke_params, "memory.track_peak_every": "0"}
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
        metrics = cpu_metrics(peak, its, fid, suffix="" if key == "10" else "_rf")
        if device != "cpu":
            metrics.update({"mem/peak_allocated_mb": peak * 100, "mem/peak_reserved_mb": peak * 120})
        log_run(store, "abl", smoke_params, metrics, tags=tags)
    log_run(store, "abl", smoke_params, {}, tags={**new, "ablation_item": "9", "failure_reason": "oom"},
            status="FAILED")


def test_ablation_table_arithmetic(store, smoke_params):
    uri, _, _ = store
    _ablation_runs(store, smoke_params)
    df = abl.load_ablation("abl", uri)
    full = abl.ablation_table(df)
    table = full.set_index("key")   # latest batch: the "old" baseline is ignored
    assert table.attrs["device"] == "cpu" and table.attrs["batch"] == "new"
    assert table.loc["baseline", "peak_live_tensors_mb"] == 10.0
    assert table.loc["3", "peak_live_tensors_mb_change_pct"] == pytest.approx(0.0)
    assert table.loc["11", "peak_live_tensors_mb_change_pct"] == pytest.approx((6.0 - 10.0) / 10.0 * 100)
    assert table.loc["11", "it_per_s_change_pct"] == pytest.approx((0.5 - 2.0) / 2.0 * 100)
    assert table.loc["6+7", "peak_live_tensors_mb_change_pct"] == pytest.approx(-15.0)
    assert table.loc["all", "fid_rf_change_pct"] == pytest.approx((70.0 - 50.0) / 50.0 * 100)
    assert table.loc["3", "fid_rf_change_pct"] == pytest.approx(4.0)
    assert table.attrs["quality_columns"] == ("fid_rf", "kid_rf_mean")
    # another extractor: its value in its own column, nothing to compare with the baseline's
    assert table.loc["10", "fid"] == 5.0 and pd.isna(table.loc["10", "fid_rf"])
    assert pd.isna(table.loc["10", "fid_rf_change_pct"]) and pd.isna(table.loc["10", "fid_change_pct"])
    assert "evaluated with inception-v3-compat" in table.loc["10", "note"]
    # claims from the guide, and rows without a toggle or a finished run
    assert table.loc["3", "claim"] == "5–10 %" and table.loc["3", "claim_low_pct"] == 5.0
    assert table.loc["11", "claim_high_pct"] == 50.0 and table.loc["all", "claim"].startswith("60–90 %")
    assert table.loc["1", "status"] == "no toggle" and table.loc["4", "status"] == "no toggle"
    assert table.loc["9", "status"].startswith("FAILED") and "oom" in table.loc["9", "status"]
    assert table.loc["chunk", "status"] == "not run"
    # made with other code than the baseline (working tree edited mid-batch): value kept, no change computed
    assert table.loc["ckpt", "peak_live_tensors_mb"] == 5.0 and pd.isna(table.loc["ckpt", "peak_live_tensors_mb_change_pct"])
    assert "fingerprint bbb vs aaa" in table.loc["ckpt", "note"]
    assert abl.pct_change(3.0, 0.0) is None and abl.pct_change(None, 1.0) is None
    md = abl.table_markdown(full)
    assert "peak live tensors MiB (Δ %)" in md and "10.00 (+0.0 %)" in md and "6.00 (-40.0 %)" in md
    assert "FID (random features) (Δ %)" in md and "FID (Inception)" not in md
    texts = abl.findings(full)
    joined = "\n".join(texts)
    assert "#3 zero_grad(set_to_none) (memory.set_to_none=true) changed peak live tensors by +0.0 %" in joined
    assert "claimed a saving of 5–10 %: the measured saving, 0.0 %, is below that" in joined
    assert "claimed a saving of 30–50 %" in joined and "the measured saving, 40.0 %, is within that" in joined
    assert "#1 no global CUDA tensor type: not measured" in joined
    assert "did not finish" in joined and "made with other code than the baseline" in joined
    assert "iterations/s +5.0 % (within the ±25.0 % run-to-run variation)" in joined     # item 3
    assert "iterations/s -75.0 %;" in joined                                             # item 11: beyond it
    assert "FID (random features) 50 → 70 (+40.0 %)" in joined                            # item all


def test_ablation_table_cuda_columns(store, smoke_params):
    uri, _, _ = store
    _ablation_runs(store, smoke_params, device="NVIDIA H100 80GB HBM3")
    table = abl.ablation_table(abl.load_ablation("abl", uri))
    assert abl.headline_measure(table) == "peak_allocated_mb"
    row = table.set_index("key").loc["11"]
    assert row["peak_allocated_mb_change_pct"] == pytest.approx(-40.0)
    assert row["peak_reserved_mb_change_pct"] == pytest.approx(-40.0)
    md = abl.table_markdown(table)
    assert "peak CUDA allocated MiB" in md and "peak CUDA reserved MiB" in md
    assert "NVIDIA H100" in abl.table_header(table)


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
    code = launch.main(["--tracking-uri", uri, "--items", "3,11", "--runs-root", str(tmp_path / "runs"),
                          "--out", str(out), "--iters", "3", "train.batch_size=1"], runner=fake_runner)
    assert code == 0 and len(calls) == 3
    joined = [" ".join(c) for c in calls]
    assert all("+exp=[smoke,baseline_fp32]" in c and "model.ccsr.mode=regularizer" in c for c in joined)
    assert all("train.max_iters=3" in c and c.index("train.max_iters=3") < c.index("train.batch_size=1")
               for c in joined)
    assert "++tracking.tags.ablation_item=11" in joined[2] and "train.amp.dtype=bf16" in joined[2]
    assert all(re.search(r"\+\+tracking\.tags\.ablation_code=[0-9a-f]{12}$", c) for c in joined)
    df = abl.load_ablation("ablation-cpu", uri)
    assert sorted(df["tags.ablation_item"]) == ["11", "3", "baseline"]
    assert set(df["batch_size"]) == {1} and set(df["ccsr_mode"]) == {"regularizer"}
    folder = out / "ablation-cpu"
    text = (folder / "report.md").read_text()
    assert "5–10 %" in text and "-40.0 %" in text and "Device: **cpu**" in text
    for png in ("ablation_changes.png", "memory_per_phase.png", "throughput_changes.png"):
        assert is_png(folder / png), png
    assert "data:image/png;base64," in (folder / "report.html").read_text()
    # logged to the reports experiment, not among the training runs it reports on
    assert len(runs.load_runs(uri, experiments=["ablation-cpu"], include_reports=True)) == 3
    rep = runs.load_runs(uri, experiments=[report.REPORTS_EXPERIMENT], include_reports=True)
    assert rep["tags.report_of"].tolist() == ["ablation-cpu"] and rep["run_name"].tolist() == ["ablation-cpu"]
    assert runs.load_runs(uri, experiments=[report.REPORTS_EXPERIMENT]).empty  # skipped by default
    # --dry-run prints, runs nothing
    assert launch.main(["--dry-run", "--preset", "gpu", "--items", "chunk"], runner=fake_runner) == 0
    assert len(calls) == 3
    # `make report` again (twice): the same report run is updated, no new one
    first = rep["run_id"].item()
    (folder / "curves_gone.png").write_bytes(PNG)                   # a plot an earlier report drew
    for _ in range(2):
        again = report.write_report("ablation-cpu", uri=uri, out=out, quiet=True)
    assert again.meta["mlflow_report_run"] == first
    rep = runs.load_runs(uri, experiments=[report.REPORTS_EXPERIMENT], include_reports=True)
    assert rep["run_id"].tolist() == [first] and rep["status"].eq("FINISHED").all()
    assert len(runs.load_runs(uri, experiments=["ablation-cpu"], include_reports=True)) == 3
    assert "report/report.md" in {f.path for f in cl.list_artifacts(first, "report")}
    assert not (folder / "curves_gone.png").exists() and is_png(folder / "ablation_changes.png")


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
        study.set_metric_names(["peak_memory_mb", "fid_rf"])
    exp_id = experiment(store, "sweep-mq")
    parent = cl.create_run(exp_id, tags={"sweep_study": "mq", "sweep_role": "parent"}).info.run_id
    cl.log_param(parent, "objectives", json.dumps([{"metric": "peak_memory_mb", "direction": "minimize"},
                                                  {"metric": "fid_rf", "direction": "minimize"}]))
    dist = {"train.batch_size": CategoricalDistribution([1, 2, 4]),
            "model.render.samples_per_ray": CategoricalDistribution([4, 8])}
    points = [(1, 4, 3.0, 60.0), (2, 4, 5.0, 50.0), (4, 8, 9.0, 55.0), (2, 8, 6.0, 40.0), (4, 4, 12.0, 30.0)]
    for n, (bs, spr, mem, fid) in enumerate(points):
        params = {**smoke_params, "train.batch_size": str(bs), "model.render.samples_per_ray": str(spr)}
        evaluations = [(2, fid + 20), (5, fid + 10), (10, fid)][1 if n == 1 else 0:]   # trial 1: two evaluations
        rid = log_run(store, "sweep-mq", params, cpu_metrics(mem, fid=fid),
                      tags={"mlflow.parentRunId": parent, "optuna_trial_number": str(n)},
                      histories={"eval/fid_rf": evaluations})
        study.add_trial(create_trial(params={"train.batch_size": bs, "model.render.samples_per_ray": spr},
                                     distributions=dist, values=[mem, fid], user_attrs={"mlflow_run_id": rid},
                                     constraints={"memory_budget_mb": mem - 10.0}))
    failed = log_run(store, "sweep-mq", {**smoke_params, "train.batch_size": "4"}, {},
                     tags={"mlflow.parentRunId": parent, "failure_reason": "oom"}, status="FAILED")
    study.add_trial(create_trial(state=TrialState.FAIL, params={"train.batch_size": 4, "model.render.samples_per_ray": 8},
                                 distributions=dist, user_attrs={"mlflow_run_id": failed, "failure_reason": "oom"}))
    df = studies.load_sweep("mq", uri, storage)
    assert len(df) == 6 and df["trial_number"].tolist() == list(range(6))
    assert df.attrs["parent_run_id"] == parent
    assert pd.api.types.is_integer_dtype(df["batch_size"])
    assert df.set_index("trial_number").loc[5, "failure_reason"] == "oom"
    assert df["trial_feasible"].tolist()[:5] == [True, True, True, True, False]

    n_runs = len(runs.load_runs(uri, experiments=["sweep-mq"], include_reports=True, include_parents=True))
    for _ in range(2):                                              # a second report updates the first
        rep = report.write_report("mq", uri=uri, storage=storage, out=tmp_path / "reports", quiet=True)
    assert rep.kind == "sweep" and rep.meta["mlflow_report_run"] == parent
    assert len(runs.load_runs(uri, experiments=["sweep-mq"], include_reports=True, include_parents=True)) == n_runs
    front = pd.read_csv(tmp_path / "reports" / "mq" / "pareto_front.csv")
    # trial 4 (12 MB) is infeasible; of the rest, 0 (3 MB), 1 (5 MB) and 3 (6 MB, FID 40) are the front
    assert sorted(front["trial"]) == [0, 1, 3]
    folder = tmp_path / "reports" / "mq"
    assert (folder / "report.md").stat().st_size > 0 and (folder / "report.html").stat().st_size > 0
    for png in ("pareto.png", "memory_vs_batch.png", "throughput_vs_memory.png", "memory_per_phase.png"):
        assert is_png(folder / png), png
    assert [p.name for p in folder.glob("curves_*.png")] == ["curves_fid_rf.png"] and is_png(folder / "curves_fid_rf.png")
    logged = {f.path for f in cl.list_artifacts(parent, "report")}
    assert "report/report.md" in logged and "report/pareto.png" in logged
    text = (folder / "report.md").read_text()
    assert "![pareto](pareto.png)" in text and "Failures by reason: oom ×1" in text
    assert "## Pareto front: peak memory (MiB) vs FID (random features)" in text
    assert "## FID (random features) over training" in text and "2 of 3 run(s) drawn" in text   # front: 0, 1, 3


def test_experiment_report_never_puts_incomparable_fids_on_one_front(store, smoke_params, tmp_path):
    """Runs scored with other sample counts, image sizes or data get fronts of their own: a 32 px
    run with 16 fakes and a 64 px run with 256 fakes are never on one front (the smoke-vs-default
    report that put them together)."""
    uri, _, _ = store
    small = {**smoke_params, "eval.num_samples": "16", "data.image_size": "32"}
    large = {**smoke_params, "eval.num_samples": "256", "data.image_size": "64"}
    for params, mem, fid in ((small, 3.0, 0.5), (small, 5.0, 0.3), (large, 100.0, 0.03), (large, 120.0, 0.02)):
        log_run(store, "mixed", params, cpu_metrics(mem, fid=fid))
    rep = report.write_report("mixed", uri=uri, out=tmp_path / "reports", quiet=True)
    folder = tmp_path / "reports" / "mixed"
    fronts = [pd.read_csv(folder / f"pareto_front_{k}.csv") for k in (1, 2)]
    assert sorted(len(f) for f in fronts) == [2, 2]
    for front in fronts:  # each front holds one kind only
        assert front["fid_rf"].max() < 0.1 or front["fid_rf"].min() > 0.1
    text = (folder / "report.md").read_text()
    assert "32 px, 16 fakes" in text and "64 px, 256 fakes" in text
    assert is_png(folder / "pareto_1.png") and is_png(folder / "pareto_2.png") and rep.kind == "experiment"


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
    assert row["device"] == "cpu" and row["fid_extractor"] == summary["fid_extractor"] == "random-features"
    for col in ("fid_rf", "kid_rf_mean", "kid_rf_std"):
        assert row[col] == pytest.approx(summary["eval"][col])
    assert {"fid", "kid_mean", "kid_std"}.isdisjoint(summary["eval"]) and df[["fid", "kid_mean"]].isna().all().all()
    assert row["peak_memory_mb"] == pytest.approx(summary["peak_memory_mb"])
    assert row["peak_memory_measure"] == summary["peak_memory_measure"]
    assert row["iterations"] == summary["iteration"] == 4
    assert runs.metric_history(row["run_id"], "train/loss_d", uri)["step"].tolist() == [1, 2, 3, 4]
    # log_every=1: one perf/it_per_s step per window with a timed iteration = the timed iterations
    timed_steps = runs.metric_history(row["run_id"], "perf/it_per_s", uri)["step"].nunique()
    assert row["timed_iterations"] == timed_steps == 1
    rep = report.write_report("real", uri=uri, out=tmp_path / "reports", quiet=True)
    assert rep.kind == "experiment"
    # the report run is in the reports experiment: the training runs' table lists training runs only
    assert len(runs.load_runs(uri, experiments=["real"], include_reports=True)) == 1
    logged = runs.load_runs(uri, experiments=[report.REPORTS_EXPERIMENT], include_reports=True)
    assert logged["run_id"].tolist() == [rep.meta["mlflow_report_run"]] and logged["tags.report_of"].item() == "real"
    for png in rep.images:
        assert is_png(png), png
    text = (tmp_path / "reports" / "real" / "report.md").read_text()
    assert "## Pareto front: peak memory (MiB) vs FID (random features)" in text and "| fid_rf |" in text
    assert "Inception" not in text
    assert "1 finished run(s) left out" in text                     # one timed iteration: throughput not measured
    assert "Not drawn: none of the 1 run(s) was evaluated at 3 or more" in text   # one evaluation: no curve


# ----------------------------------------------------------------------------- slow: two real ablation runs


@pytest.mark.slow
def test_two_real_ablation_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = launch.main(["--tracking-uri", uri, "--items", "3", "--iters", "3", "--runs-root", str(tmp_path / "runs"),
                          "--out", str(tmp_path / "reports"), "--experiment", "abl-slow"])
    assert code == 0
    table = abl.ablation_table(abl.load_ablation("abl-slow", uri)).set_index("key")
    assert table.loc["baseline", "status"] == "FINISHED" and table.loc["3", "status"] == "FINISHED"
    base, item = table.loc["baseline", "peak_live_tensors_mb"], table.loc["3", "peak_live_tensors_mb"]
    assert table.loc["3", "peak_live_tensors_mb_change_pct"] == pytest.approx((item - base) / base * 100)
    assert is_png(tmp_path / "reports" / "abl-slow" / "ablation_changes.png")


def test_the_code_snapshot_runs_with_its_own_configs(tmp_path):
    """The ablation's training runs start in a frozen copy of the code; there, the copy's conf/
    (not the working tree's, not the installed package's) composes the config."""
    import subprocess
    import sys

    dest = launch.snapshot_code(tmp_path / "code")
    (dest / "conf" / "exp" / "only_in_the_copy.yaml").write_text("# @package _global_\ntrain:\n  max_iters: 7\n")
    result = subprocess.run([sys.executable, "-m", "grafccsr.train", "+exp=[smoke,only_in_the_copy]", "--cfg", "job"],
                            cwd=dest, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "max_iters: 7" in result.stdout


def test_plots_readable_labels(tmp_path):
    """Titles name the device, axes carry units (checked on the figure objects)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame({"run_id": ["a", "b", "c", "d"], "run_name": list("abcd"), "status": ["FINISHED"] * 3 + ["FAILED"],
                       "batch_size": [2, 4, 2, 8], "samples_per_ray": [8, 8, 16, 8], "amp": [False, False, True, False],
                       "peak_memory_mb": [1.0, 2.0, 1.5, float("nan")], "it_per_s": [3.0, 2.0, 1.0, float("nan")],
                       "peak_memory_measure": ["peak_live_tensors"] * 3 + [None], "device": ["cpu"] * 4,
                       "failure_reason": [None, None, None, "oom"], "fid_rf": [1.0, 2.0, 3.0, float("nan")],
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

    preset = items.PRESETS["gpu"]
    plan = launch.AblationPlan(preset, preset.iters, "x", "sqlite:////nonexistent/x.db", "b", Path("/tmp/r"),
                               items.select_items("11,all"))
    got = {}
    for item, cmd, _ in plan.commands:
        cfg = load_config([c for c in cmd[3:] if not c.startswith("hydra.")])
        got[item.key] = cfg
        assert cfg.train.device == "cuda" and cfg.train.batch_size == 8 and cfg.model.patch.rays_per_patch == 4096
        assert cfg.model.ccsr.mode == "regularizer" and cfg.tracking.tags["ablation_item"] == item.key
    assert not got["baseline"].memory.set_to_none and got["baseline"].train.amp.policy == "off"
    assert (got["11"].train.amp.policy, got["11"].train.amp.dtype) == ("all", "fp16")
    assert got["all"].exp_name == "seed_all" and got["all"].memory.ccsr_no_grad


# ----------------------------------------------------------------------------- too little data: said, not drawn


def test_timed_iterations_follow_the_loop_rule():
    """The count matches the training loop's rule (grafccsr/training/loop.py): an iteration is
    tracked (not timed) when it is one of the first two or a multiple of track_peak_every."""
    for k in range(0, 6):
        for n in range(0, 30):
            tracked = sum(1 for i in range(n) if k > 0 and (i < 2 or i % k == 0))
            assert runs.timed_iterations(n, k) == n - tracked, (n, k)
    assert runs.timed_iterations(None, 2) is pd.NA and runs.timed_iterations(10, float("nan")) is pd.NA


def test_too_few_points_are_not_drawn_as_measured(tmp_path):
    n = runs.MIN_TIMED_ITERATIONS
    df = pd.DataFrame({"run_id": ["a", "b", "c"], "run_name": list("abc"), "status": ["FINISHED"] * 3,
                       "peak_memory_mb": [1.0, 2.0, 3.0], "peak_memory_measure": ["peak_live_tensors"] * 3,
                       "it_per_s": [3.0, 2.0, 1.0], "timed_iterations": [1, n - 1, n], "amp": [False] * 3,
                       "batch_size": [1, 2, 4], "samples_per_ray": [8] * 3, "device": ["cpu"] * 3})
    assert runs.measured_throughput(df).isna().tolist() == [True, True, False]
    seen = []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    orig = plt.Figure.savefig

    def spy(fig, *a, **k):
        for ax in fig.axes:
            seen.append(([len(c.get_offsets()) for c in ax.collections], [t.get_text() for t in ax.texts],
                         [t.get_text() for t in (ax.get_legend().get_texts() if ax.get_legend() else [])]))
        return orig(fig, *a, **k)

    plt.Figure.savefig = spy
    try:
        assert is_png(plots.plot_throughput_vs_memory(df, tmp_path / "t.png"))
        assert is_png(plots.plot_throughput_vs_memory(df.iloc[:2], tmp_path / "none.png"))
    finally:
        plt.Figure.savefig = orig
    (points, _, legend), (_, message, _) = seen
    assert points == [1] and any(f"2 run(s) with fewer than {n} timed iterations" in t for t in legend)
    assert f"2 run(s) with fewer than {n} timed iterations: throughput not measured" in message[0]
    # a curve needs MIN_CURVE_POINTS evaluations
    hist = pd.DataFrame({"run_id": ["a", "a", "b", "b", "b"], "key": ["eval/fid_rf"] * 5, "step": [5, 10, 2, 5, 10],
                         "value": [3.0, 2.0, 4.0, 3.0, 2.0]})
    assert plots.MIN_CURVE_POINTS == 3 and plots.curve_runs(hist, "eval/fid_rf") == ["b"]
    assert plots.plot_curves(hist[hist["run_id"] == "a"], tmp_path / "c.png", ["eval/fid_rf"]) is None
    assert not (tmp_path / "c.png").exists()
    assert is_png(plots.plot_curves(hist, tmp_path / "c.png", ["eval/fid_rf"]))


def test_ablation_throughput_from_few_iterations_is_not_measured(store, smoke_params):
    """Runs with fewer than MIN_TIMED_ITERATIONS timed iterations: it/s not compared, said so."""
    uri, _, _ = store
    for key in ("baseline", "3"):    # smoke: 10 iterations with tracking every 2nd leave 4 timed
        log_run(store, "few", smoke_params, cpu_metrics(10.0, 2.0 if key == "baseline" else 4.0),
                tags={"ablation_item": key, "ablation_batch": "b"})
    table = abl.ablation_table(abl.load_ablation("few", uri))
    row = table.set_index("key").loc["3"]
    assert row["timed_iterations"] == 4 and pd.isna(row["it_per_s"]) and pd.isna(row["it_per_s_change_pct"])
    assert "not measured (4 timed it.)" in abl.table_markdown(table)
    assert f"fewer than {runs.MIN_TIMED_ITERATIONS} timed iterations" in abl.table_header(table)
    assert "iterations/s not measured" in "\n".join(abl.findings(table))


# ----------------------------------------------------------------------------- stores reached through their clients


def test_store_urls_are_passed_to_their_clients(tmp_path, monkeypatch):
    """Server URLs are used as given (never turned into paths); a database storage without its
    driver says which one, without the password; journal files are read like SQLite files."""
    import optuna

    assert runs.resolve_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"
    assert runs.resolve_tracking_uri("sqlite:///rel.db") == f"sqlite:///{Path('rel.db').resolve()}"
    assert runs.redact("postgresql+psycopg2://me:secret@db:5432/optuna") == "postgresql+psycopg2://me:***@db:5432/optuna"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError) as err:
            studies.open_storage("postgresql+psycopg2://me:secret@db.invalid:5432/optuna")
        assert "psycopg2" in str(err.value) and "secret" not in str(err.value)
    journal = f"journal:{tmp_path / 'j.log'}"
    assert studies.study_names(journal) == [] and not (tmp_path / "j.log").exists()
    from optuna.storages.journal import JournalFileBackend

    optuna.create_study(study_name="j", storage=optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "j.log"))))
    assert studies.study_names(journal) == ["j"] and studies.load_study("j", journal).study_name == "j"
    # an existing SQLite file without Optuna's tables is not turned into a study database by reading it
    empty = tmp_path / "empty.db"
    import sqlite3

    sqlite3.connect(empty).close()
    with pytest.raises(Exception):
        studies.study_names(f"sqlite:///{empty}")
    assert sqlite3.connect(empty).execute("select count(*) from sqlite_master").fetchone() == (0,)


def test_analysis_imports_point_one_way():
    """No import cycle inside analysis/ (function-level imports included), and the tables never
    import the report: the report reads the ablation's table, the launcher calls the report."""
    import ast

    modules = {}
    for path in (ROOT / "analysis").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("analysis"):
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("analysis")}
        modules[name] = deps
    graph = {m: {d for d in deps if d in modules and d != m and d != "analysis"} for m, deps in modules.items()}
    for start in graph:                       # depth-first search for a path back to start
        stack, seen = list(graph[start]), set()
        while stack:
            m = stack.pop()
            assert m != start, f"import cycle through {start}"
            if m not in seen:
                seen.add(m)
                stack.extend(graph[m])
    for table_side in ("analysis.ablation.table", "analysis.ablation.items", "analysis.runs", "analysis.studies"):
        assert not graph[table_side] & {"analysis.report", "analysis.sections", "analysis.ablation.launch"}, table_side
    assert "analysis.ablation.launch" not in graph["analysis.report"] | graph["analysis.sections"]


def test_runs_from_a_tracking_server_read_the_same(store, smoke_params):
    """A tracking server sends runs as protobuf (MLflow's REST store): the same runs after a
    proto round trip give the same frame, iterations and quality columns included."""
    from mlflow.entities import Run

    uri, cl, _ = store
    log_run(store, "srv", smoke_params, cpu_metrics(4.0), histories={"system/cpu_utilization_percentage": [(99, 1.0)]})
    exp_id = cl.get_experiment_by_name("srv").experiment_id
    local = runs.search_runs(cl, [exp_id])
    served = [Run.from_proto(r.to_proto()) for r in local]
    a, b = runs.runs_to_frame(local), runs.runs_to_frame(served)
    pd.testing.assert_frame_equal(a, b)
    assert b.loc[0, "iterations"] == 10 and b.loc[0, "fid_rf"] == 50.0


def test_time_to_quality_curves_draw_two_snapshots(tmp_path):
    """The benchmark's own fractions decide its points: with --fractions 0.5,1.0 every recipe has
    two, and each is drawn (the figure in the README was once empty: a minimum of three points
    meant for MLflow histories hid every recipe)."""
    import matplotlib.pyplot as plt

    from analysis.quality import plot_curves

    def curve(values):
        return [{"fraction": f, "seconds": 120 * f, "mean": v, "min": v / 2, "max": v * 2, "n": 3}
                for f, v in zip((0.5, 1.0), values)]

    summary = {"recipes": {name: {"seeds": 3, "curve_fid": curve(v), "curve_kid": curve([x / 100 for x in v])}
                           for name, v in (("fast", [0.1, 0.03]), ("ball", [0.04, 0.03]), ("none", []))}}
    summary["recipes"]["none"].update(curve_fid=[], curve_kid=[])
    seen, orig = [], plt.Figure.savefig

    def spy(fig, *a, **k):
        seen.extend([[len(line.get_xdata()) for line in ax.lines] for ax in fig.axes])
        return orig(fig, *a, **k)

    plt.Figure.savefig = spy
    try:
        assert is_png(plot_curves(summary, tmp_path / "curves.png"))
    finally:
        plt.Figure.savefig = orig
    assert seen == [[2, 2], [2, 2]]  # FID and KID: two recipes of two snapshots each; the empty one left out
