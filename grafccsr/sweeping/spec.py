"""Study definitions (``sweeps/*.yaml``): loading, validation, override formatting.

Pure Python + PyYAML: importing this module does not import Optuna or MLflow.
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml

from grafccsr.metrics.keys import VIEW_COLUMNS
from grafccsr.paths import IN_CHECKOUT, PROJECT_ROOT

STUDIES_DIR = PROJECT_ROOT / "sweeps" if IN_CHECKOUT else Path(__file__).resolve().parent.parent / "studies"
"""The shipped study files: ``sweeps/`` in a checkout, the package ``grafccsr.studies`` installed."""
GPU_STUDY = "memory_quality"
"""The study `make sweep` runs on a machine with CUDA."""
CPU_STUDY = "memory_quality_cpu"
"""... and on one without: the same question at CPU sizes."""

# Objective name -> path into metrics.json. FID/KID names carry the extractor: fid_rf / kid_rf_*
# for the offline random-feature extractor, fid / kid_* for torch-fidelity's Inception. The
# pose-matched scores on held-out views (view_psnr, view_ssim_best, ...; higher is better) are
# objectives too, overall or for one class (view_psnr/<class>).
METRIC_PATHS: Dict[str, tuple] = {
    "peak_memory_mb": ("peak_memory_mb",),
    "fid": ("eval", "fid"),
    "kid_mean": ("eval", "kid_mean"),
    "kid_std": ("eval", "kid_std"),
    "fid_rf": ("eval", "fid_rf"),
    "kid_rf_mean": ("eval", "kid_rf_mean"),
    "kid_rf_std": ("eval", "kid_rf_std"),
    "it_per_s": ("perf", "perf/it_per_s"),
    "rays_per_s": ("perf", "perf/rays_per_s"),
    "points_per_s": ("perf", "perf/points_per_s"),
    "process_peak_rss_mb": ("process_peak_rss_mb",),
    **{name: ("eval", name) for name in VIEW_COLUMNS},
}
DEFAULT_OBJECTIVES = [("peak_memory_mb", "minimize"), ("fid_rf", "minimize")]
SAMPLERS = ("tpe", "nsga2", "grid", "random")
PARAM_TYPES = ("categorical", "int", "float")
STUDY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

_TOP_KEYS = {
    "study_name", "storage", "sampler", "seed", "sampler_options", "n_trials", "objectives",
    "memory_budget_mb", "precheck_memory", "base_overrides", "search_space", "enqueue",
    "mlflow_experiment", "timeout_per_trial_s", "trainer_cmd", "heartbeat_interval_s", "grace_period_s",
    "launcher", "nproc_per_node", "submitit",
}
LAUNCHERS = ("local", "torchrun", "submitit")
SUBMITIT_CLUSTERS = ("auto", "slurm", "local")
_SUBMITIT_KEYS = {"cluster", "folder", "partition", "gpus_per_trial", "cpus_per_trial", "mem_gb", "time_limit_min",
                  "slurm_additional_parameters", "setup"}


class SpecError(ValueError):
    """A study definition is invalid (the CLI exits with code 2)."""


# ------------------------------------------------------------------ YAML loading


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: only true/false are booleans (so ``off`` stays the
    string Hydra expects for ``train.amp.policy``) and ``1e-3`` is a float."""


_Yaml12Loader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(path: Path) -> Any:
    with open(path) as fh:
        return yaml.load(fh, Loader=_Yaml12Loader)


# ------------------------------------------------------------------ dataclasses


@dataclass
class Objective:
    metric: str
    direction: str  # minimize | maximize

    def extract(self, summary: Mapping[str, Any]) -> Optional[float]:
        """The metric's value in a metrics.json dict; None when absent or not finite."""
        return extract_metric(summary, self.metric)


def extract_metric(summary: Mapping[str, Any], metric: str) -> Optional[float]:
    path = METRIC_PATHS.get(metric) or (("eval", metric) if is_view_metric(metric) else tuple(metric.split(".")))
    node: Any = summary
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        return None
    value = float(node)
    return value if math.isfinite(value) else None


def is_view_metric(metric: str) -> bool:
    """A pose-matched score, overall (``view_psnr``) or of one class (``view_psnr/<class>``)."""
    return metric.split("/", 1)[0] in VIEW_COLUMNS


@dataclass
class Param:
    name: str  # the Hydra override key, also the Optuna parameter name
    type: str
    choices: Optional[List[Any]] = None
    low: Optional[float] = None
    high: Optional[float] = None
    step: Optional[float] = None
    log: bool = False

    def distribution(self):
        from optuna.distributions import (CategoricalDistribution, FloatDistribution,
                                          IntDistribution)

        if self.type == "categorical":
            return CategoricalDistribution(list(self.choices))
        if self.type == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log,
                                   step=int(self.step) if self.step is not None else 1)
        return FloatDistribution(float(self.low), float(self.high), log=self.log,
                                 step=float(self.step) if self.step is not None else None)

    def grid_values(self) -> List[Any]:
        """Every value, for the grid sampler (categoricals, ints, floats with a step)."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            step = int(self.step or 1)
            if self.log:
                raise SpecError(f"search_space.{self.name}: the grid sampler cannot enumerate a log int range; "
                                "list the values as a categorical")
            return list(range(int(self.low), int(self.high) + 1, step))
        if self.step is None or self.log:
            raise SpecError(f"search_space.{self.name}: the grid sampler needs a float range with a step "
                            "(or a categorical)")
        n = int(round((self.high - self.low) / self.step))
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return any(value == c and type(value) is type(c) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.type == "int" and float(value) != int(value):
            return False
        return self.low <= value <= self.high

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"type": self.type}
        if self.type == "categorical":
            out["choices"] = self.choices
        else:
            out.update(low=self.low, high=self.high)
            if self.step is not None:
                out["step"] = self.step
            if self.log:
                out["log"] = True
        return out


@dataclass
class SubmititSpec:
    """``submitit:`` in a study file: one job per trial (SLURM, or submitit's local executor)."""

    cluster: str = "auto"
    """auto (SLURM when ``sbatch`` is on PATH, else local processes) | slurm | local."""
    folder: Optional[str] = None
    """Job scripts, pickles and logs (``%j`` = job id); default ``<runs root>/sweeps/<study>/submitit``.
    On SLURM it and the runs root must be on a filesystem shared with the nodes."""
    partition: Optional[str] = None
    gpus_per_trial: Optional[int] = None
    """Default: ``nproc_per_node`` when the trials run on CUDA, else 0."""
    cpus_per_trial: Optional[int] = None
    mem_gb: Optional[float] = None
    time_limit_min: Optional[float] = None
    """Job time limit; default ``timeout_per_trial_s`` + 5 min, else 24 h (never submitit's 2 min default)."""
    slurm_additional_parameters: Dict[str, Any] = field(default_factory=dict)
    """Extra ``#SBATCH`` options, e.g. ``{account: proj, qos: high}``."""
    setup: List[str] = field(default_factory=list)
    """Shell lines run before the job on SLURM (``module load ...``, ``source venv/bin/activate``)."""


@dataclass
class StudySpec:
    study_name: str
    search_space: Dict[str, Param]
    storage: Optional[str] = None
    sampler: str = "tpe"
    seed: int = 0
    sampler_options: Dict[str, Any] = field(default_factory=dict)
    n_trials: int = 20
    objectives: List[Objective] = field(default_factory=lambda: [Objective(m, d) for m, d in DEFAULT_OBJECTIVES])
    memory_budget_mb: Optional[float] = None
    precheck_memory: Any = "auto"  # auto | true | false
    base_overrides: List[str] = field(default_factory=list)
    enqueue: List[Dict[str, Any]] = field(default_factory=list)
    mlflow_experiment: Optional[str] = None
    timeout_per_trial_s: Optional[float] = None
    trainer_cmd: Optional[List[str]] = None
    heartbeat_interval_s: Optional[int] = 60
    grace_period_s: Optional[int] = None
    """Seconds without a heartbeat before a RUNNING trial is failed (default 2 x interval)."""
    launcher: str = "local"
    nproc_per_node: int = 1
    submitit: SubmititSpec = field(default_factory=SubmititSpec)
    source: Optional[Path] = None

    @property
    def experiment_name(self) -> str:
        return self.mlflow_experiment or f"sweep-{self.study_name}"

    @property
    def directions(self) -> List[str]:
        return [o.direction for o in self.objectives]

    @property
    def metric_names(self) -> List[str]:
        return [o.metric for o in self.objectives]

    @property
    def uses_torchrun(self) -> bool:
        return self.launcher == "torchrun" or (self.launcher == "submitit" and self.nproc_per_node > 1)

    def command(self, trainer_cmd: Optional[Sequence[str]] = None) -> List[str]:
        """The trial's command before its overrides: the trainer, under torchrun for
        ``launcher: torchrun`` (``torchrun --standalone --nproc_per_node=N -m grafccsr.train``, spelt
        ``python -m torch.distributed.run`` so that this interpreter's torch runs it)."""
        custom = list(trainer_cmd or self.trainer_cmd or [])
        base = custom or [sys.executable, "-m", "grafccsr.train"]
        if not self.uses_torchrun:
            return base
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={self.nproc_per_node}"]
        return [*torchrun, "-m", "grafccsr.train"] if not custom else [*torchrun, "--no-python", *custom]

    def distributions(self) -> Dict[str, Any]:
        return {name: p.distribution() for name, p in self.search_space.items()}

    def grid(self) -> Dict[str, List[Any]]:
        return {name: p.grid_values() for name, p in self.search_space.items()}

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values())

    def search_space_json(self) -> Dict[str, Any]:
        return {name: p.to_json() for name, p in self.search_space.items()}


# ------------------------------------------------------------------ parsing


def _as_number(where: str, value: Any, kind=float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{where} must be a number, got {value!r}")
    if kind is int and float(value) != int(value):
        raise SpecError(f"{where} must be an integer, got {value!r}")
    return kind(value)


def _parse_param(name: str, raw: Any) -> Param:
    where = f"search_space.{name}"
    if isinstance(raw, list):  # shorthand: a list of choices
        raw = {"type": "categorical", "choices": raw}
    if not isinstance(raw, Mapping):
        raise SpecError(f"{where} must be a mapping like {{type: categorical, choices: [...]}}")
    unknown = set(raw) - {"type", "choices", "low", "high", "step", "log"}
    if unknown:
        raise SpecError(f"{where}: unknown keys {sorted(unknown)}")
    ptype = raw.get("type", "categorical" if "choices" in raw else None)
    if ptype not in PARAM_TYPES:
        raise SpecError(f"{where}.type must be one of {PARAM_TYPES}, got {ptype!r}")
    if ptype == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpecError(f"{where}.choices must be a non-empty list")
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise SpecError(f"{where}.choices: {c!r} is not a scalar")
        if len({repr(c) for c in choices}) != len(choices):
            raise SpecError(f"{where}.choices has duplicates: {choices}")
        return Param(name, ptype, choices=list(choices))
    kind = int if ptype == "int" else float
    if "low" not in raw or "high" not in raw:
        raise SpecError(f"{where} needs low and high")
    low = _as_number(f"{where}.low", raw["low"], kind)
    high = _as_number(f"{where}.high", raw["high"], kind)
    step = raw.get("step")
    step = _as_number(f"{where}.step", step, kind) if step is not None else None
    log = bool(raw.get("log", False))
    if low > high:
        raise SpecError(f"{where}: low ({low}) > high ({high})")
    if log and low <= 0:
        raise SpecError(f"{where}: log scale needs low > 0")
    if log and step not in (None, 1):
        raise SpecError(f"{where}: step and log cannot be combined")
    if step is not None and step <= 0:
        raise SpecError(f"{where}.step must be > 0")
    return Param(name, ptype, low=low, high=high, step=step, log=log)


def _precheck(value: Any) -> Any:
    if value in (True, False, "auto"):
        return value
    raise SpecError(f"precheck_memory must be auto, true or false, got {value!r}")


def override_value(overrides: Sequence[str], key: str) -> Optional[str]:
    """The last value given to ``key`` in a list of Hydra overrides (None if absent)."""
    found = None
    for o in overrides:
        if "=" in o and o.split("=", 1)[0].lstrip("+") == key:
            found = o.split("=", 1)[1].strip("'\"")
    return found


def parse_spec(raw: Mapping[str, Any], source: Optional[Path] = None) -> StudySpec:
    if not isinstance(raw, Mapping):
        raise SpecError("a study definition must be a YAML mapping")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise SpecError(f"unknown keys {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    name = raw.get("study_name") or (source.stem if source else None)
    if not isinstance(name, str) or not STUDY_NAME_RE.match(name):
        raise SpecError(f"study_name must match {STUDY_NAME_RE.pattern}, got {name!r}")

    space_raw = raw.get("search_space")
    if not isinstance(space_raw, Mapping) or not space_raw:
        raise SpecError("search_space must be a non-empty mapping of override key -> distribution")
    space = {str(k): _parse_param(str(k), v) for k, v in space_raw.items()}

    sampler = str(raw.get("sampler", "tpe")).lower().replace("-", "").replace("_", "")
    sampler = {"nsgaii": "nsga2", "bruteforce": "grid"}.get(sampler, sampler)
    if sampler not in SAMPLERS:
        raise SpecError(f"sampler must be one of {SAMPLERS}, got {raw.get('sampler')!r}")

    objectives = _parse_objectives(raw.get("objectives"))

    n_trials = _as_number("n_trials", raw.get("n_trials", 20), int)
    if n_trials < 0:
        raise SpecError("n_trials must be >= 0")
    budget = raw.get("memory_budget_mb")
    budget = _as_number("memory_budget_mb", budget) if budget is not None else None
    if budget is not None and budget <= 0:
        raise SpecError("memory_budget_mb must be > 0")
    timeout = raw.get("timeout_per_trial_s")
    timeout = _as_number("timeout_per_trial_s", timeout) if timeout is not None else None
    running = _parse_running(raw)

    base = raw.get("base_overrides") or []
    if not isinstance(base, list) or not all(isinstance(b, str) and "=" in b for b in base):
        raise SpecError("base_overrides must be a list of 'key=value' strings")
    base_keys = {_override_key(b) for b in base}
    clash = base_keys & set(space)
    if clash:
        raise SpecError(f"keys both in base_overrides and search_space: {sorted(clash)}")

    enqueue = raw.get("enqueue") or []
    if not isinstance(enqueue, list) or not all(isinstance(e, Mapping) for e in enqueue):
        raise SpecError("enqueue must be a list of {override key: value} mappings")
    for i, params in enumerate(enqueue):
        extra = set(params) - set(space)
        if extra:
            raise SpecError(f"enqueue[{i}] has keys not in search_space: {sorted(extra)}")
    trainer_cmd = raw.get("trainer_cmd")
    if trainer_cmd is not None and (not isinstance(trainer_cmd, list) or not trainer_cmd):
        raise SpecError("trainer_cmd must be a non-empty list of strings")
    options = raw.get("sampler_options") or {}
    if not isinstance(options, Mapping):
        raise SpecError("sampler_options must be a mapping of keyword arguments")

    spec = StudySpec(
        study_name=name, search_space=space, storage=raw.get("storage"), sampler=sampler,
        seed=_as_number("seed", raw.get("seed", 0), int), sampler_options=dict(options), n_trials=n_trials,
        objectives=objectives, memory_budget_mb=budget, precheck_memory=_precheck(raw.get("precheck_memory", "auto")),
        base_overrides=list(base), enqueue=[dict(e) for e in enqueue],
        mlflow_experiment=raw.get("mlflow_experiment"), timeout_per_trial_s=timeout,
        trainer_cmd=[str(c) for c in trainer_cmd] if trainer_cmd else None,
        source=source, **running,
    )
    if sampler == "grid":
        spec.grid()  # raises SpecError for ranges it cannot enumerate
    for i, params in enumerate(spec.enqueue):
        for key, value in params.items():
            if not spec.search_space[key].contains(value):
                raise SpecError(f"enqueue[{i}].{key}={value!r} lies outside the search space")
    return spec


def _parse_objectives(objectives_raw: Any) -> List[Objective]:
    if objectives_raw is None:
        return [Objective(m, d) for m, d in DEFAULT_OBJECTIVES]
    if not isinstance(objectives_raw, list) or not objectives_raw:
        raise SpecError("objectives must be a non-empty list of {metric, direction}")
    objectives = []
    for i, o in enumerate(objectives_raw):
        if isinstance(o, str):
            o = {"metric": o}
        if not isinstance(o, Mapping) or "metric" not in o:
            raise SpecError(f"objectives[{i}] must be {{metric: ..., direction: minimize|maximize}}")
        metric = str(o["metric"])
        if metric not in METRIC_PATHS and "." not in metric and not is_view_metric(metric):
            raise SpecError(f"objectives[{i}].metric {metric!r} unknown; use one of {sorted(METRIC_PATHS)}, "
                            "view_<metric>/<class>, or a dotted path into metrics.json")
        higher_is_better = metric.endswith("_per_s") or is_view_metric(metric)
        direction = str(o.get("direction", "maximize" if higher_is_better else "minimize")).lower()
        if direction not in ("minimize", "maximize"):
            raise SpecError(f"objectives[{i}].direction must be minimize or maximize")
        objectives.append(Objective(metric, direction))
    if len({o.metric for o in objectives}) != len(objectives):
        raise SpecError("objectives repeat a metric")
    return objectives


def _parse_running(raw: Mapping[str, Any]) -> Dict[str, Any]:
    """How trials run: heartbeats, launcher, ranks, submitit settings (StudySpec fields)."""
    heartbeat = raw.get("heartbeat_interval_s", 60)
    heartbeat = _as_number("heartbeat_interval_s", heartbeat, int) if heartbeat is not None else None
    if heartbeat is not None and heartbeat <= 0:
        heartbeat = None
    grace = raw.get("grace_period_s")
    grace = _as_number("grace_period_s", grace, int) if grace is not None else None
    if grace is not None and grace <= 0:
        raise SpecError("grace_period_s must be > 0")
    if grace is not None and heartbeat is not None and grace <= heartbeat:
        raise SpecError(f"grace_period_s ({grace}) must exceed heartbeat_interval_s ({heartbeat}): a live "
                        "trial would be failed between two heartbeats")
    launcher = str(raw.get("launcher", "local")).lower()
    if launcher not in LAUNCHERS:
        raise SpecError(f"launcher must be one of {LAUNCHERS}, got {raw.get('launcher')!r}")
    nproc = _as_number("nproc_per_node", raw.get("nproc_per_node", 1), int)
    if nproc < 1:
        raise SpecError("nproc_per_node must be >= 1")
    if launcher == "local" and nproc > 1:
        raise SpecError("nproc_per_node > 1 needs launcher: torchrun (or submitit)")
    return {"heartbeat_interval_s": heartbeat, "grace_period_s": grace, "launcher": launcher,
            "nproc_per_node": nproc, "submitit": _parse_submitit(raw.get("submitit"), launcher)}


def _parse_submitit(raw: Any, launcher: str) -> SubmititSpec:
    if raw is None:
        return SubmititSpec()
    if launcher != "submitit":
        raise SpecError("submitit: settings need launcher: submitit")
    if not isinstance(raw, Mapping):
        raise SpecError("submitit must be a mapping (cluster, partition, gpus_per_trial, time_limit_min, mem_gb, ...)")
    unknown = set(raw) - _SUBMITIT_KEYS
    if unknown:
        raise SpecError(f"submitit: unknown keys {sorted(unknown)}; allowed: {sorted(_SUBMITIT_KEYS)}")
    out = SubmititSpec()
    cluster = str(raw.get("cluster", "auto")).lower()
    if cluster not in SUBMITIT_CLUSTERS:
        raise SpecError(f"submitit.cluster must be one of {SUBMITIT_CLUSTERS}, got {raw.get('cluster')!r}")
    out.cluster = cluster
    out.folder = str(raw["folder"]) if raw.get("folder") else None
    out.partition = str(raw["partition"]) if raw.get("partition") else None
    for key, kind in (("gpus_per_trial", int), ("cpus_per_trial", int), ("mem_gb", float), ("time_limit_min", float)):
        if raw.get(key) is not None:
            value = _as_number(f"submitit.{key}", raw[key], kind)
            if value < 0 or (key != "gpus_per_trial" and value == 0):
                raise SpecError(f"submitit.{key} must be > 0")
            setattr(out, key, value)
    extra = raw.get("slurm_additional_parameters") or {}
    if not isinstance(extra, Mapping):
        raise SpecError("submitit.slurm_additional_parameters must be a mapping of #SBATCH options")
    out.slurm_additional_parameters = dict(extra)
    setup = raw.get("setup") or []
    if not isinstance(setup, list) or not all(isinstance(line, str) for line in setup):
        raise SpecError("submitit.setup must be a list of shell lines")
    out.setup = list(setup)
    return out


def shipped_studies() -> List[str]:
    """The names of the study files that come with the project (``grafccsr-sweep NAME``)."""
    return sorted(p.stem for p in STUDIES_DIR.glob("*.yaml"))


def find_study(name_or_path: str | Path) -> Path:
    """A study file given by path, or a shipped study by name (``smoke``, ``smoke.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.parent == Path(".") and (STUDIES_DIR / f"{path.stem}.yaml").is_file() and path.suffix in ("", ".yaml"):
        return STUDIES_DIR / f"{path.stem}.yaml"
    names = shipped_studies()
    hint = f"; shipped studies, by name: {', '.join(names)}" if names else ""
    raise SpecError(f"study file not found: {path}{hint}")


def load_spec(path: Path) -> StudySpec:
    path = find_study(path)
    try:
        raw = load_yaml(path)
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: invalid YAML: {err}") from None
    try:
        return parse_spec(raw, source=path)
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from None
    except ValueError as err:  # e.g. a categorical value Optuna rejects
        raise SpecError(f"{path}: {err}") from None


# ------------------------------------------------------------------ overrides

_PLAIN = re.compile(r"^[A-Za-z0-9_./:@+\-]+$")
_HYDRA_KEYWORDS = re.compile(r"^(?:true|false|null|none|nan|[-+]?inf|[-+]?[0-9._eE+\-]+)$", re.IGNORECASE)


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def format_value(value: Any) -> str:
    """A Python value as a Hydra override value (strings that would parse as something else are quoted)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"non-finite override value {value}")
        return repr(value)
    text = str(value)
    if _PLAIN.match(text) and not _HYDRA_KEYWORDS.match(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def format_override(key: str, value: Any) -> str:
    return f"{key}={format_value(value)}"


def trial_overrides(params: Mapping[str, Any]) -> List[str]:
    return [format_override(k, v) for k, v in params.items()]


def short_names(keys: Sequence[str]) -> Dict[str, str]:
    """``train.amp.policy`` -> ``policy`` unless two keys share a last component."""
    last = [k.split(".")[-1].lstrip("+") for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def overrides_by_key(overrides: Sequence[str]) -> Dict[str, str]:
    """Hydra overrides as ``key -> override`` (the last one of a key wins, as in Hydra)."""
    return {_override_key(o): o for o in overrides}


def override_difference(recorded: Sequence[str], now: Sequence[str]) -> str:
    """What changed between two lists of fixed overrides, in a few words ('' when nothing did):
    ``train.max_iters=4 -> train.max_iters=8; added eval.num_samples=32; dropped train.ckpt_every=0``."""
    old, new = overrides_by_key(recorded), overrides_by_key(now)
    parts = [f"{old[k]} -> {new[k]}" for k in old if k in new and old[k] != new[k]]
    added = [new[k] for k in new if k not in old]
    dropped = [old[k] for k in old if k not in new]
    if added:
        parts.append("added " + " ".join(added))
    if dropped:
        parts.append("dropped " + " ".join(dropped))
    return "; ".join(parts)


def derived_study_name(name: str, fixed_overrides: Sequence[str]) -> str:
    """The study a run with other fixed overrides goes to with ``--new-study``: the same name
    with a digest of the overrides, so that the same command resumes it."""
    digest = hashlib.sha1("\n".join(overrides_by_key(fixed_overrides).values()).encode()).hexdigest()[:8]
    return f"{name}-{digest}"
