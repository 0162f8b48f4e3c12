"""From ``conf/`` and ``key=value`` overrides to a validated :class:`Config`.

Hydra and OmegaConf compose the YAML files and check types, but OmegaConf 2.3 knows no
``Literal``. So Hydra is given a mirror of the schema with each ``Literal`` replaced by its
base type (:func:`hydra_schema`), and :func:`to_config` rebuilds the real dataclasses from
the composed values, checking choices, bounds, unknown keys and every section's
cross-field ``check``. Errors are :class:`ConfigError` with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Type

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from grafccsr.config.docs import help_template
from grafccsr.config.schema import Config, ConfigError
from grafccsr.paths import CONF_DIR

SCHEMA_NAME = "base_config"
"""Name of the schema node in Hydra's ConfigStore (``conf/config.yaml`` lists it first)."""


# --------------------------------------------------------------------------- the schema Hydra sees


def _literal_base(tp: Any) -> Optional[type]:
    if typing.get_origin(tp) is typing.Literal:
        return type(typing.get_args(tp)[0])
    return None


@functools.lru_cache(maxsize=None)
def hydra_schema(cls: Type) -> Type:
    """A dataclass like ``cls`` (recursively) with every ``Literal[...]`` typed as its base type."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            mirror = hydra_schema(tp)
            fields.append((f.name, mirror, dataclasses.field(default_factory=mirror)))
            continue
        tp = _literal_base(tp) or tp
        if f.default is not dataclasses.MISSING:
            fields.append((f.name, tp, dataclasses.field(default=f.default)))
        else:
            fields.append((f.name, tp, dataclasses.field(default_factory=f.default_factory)))
    return dataclasses.make_dataclass(cls.__name__, fields)


def register_configs() -> None:
    """Put the schema into Hydra's ConfigStore as ``base_config``, and the ``--help`` text
    generated from it as ``hydra/help=grafccsr``."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node=hydra_schema(Config))
    store.store(group="hydra/help", name="grafccsr", node=help_template())


# --------------------------------------------------------------------------- values -> dataclasses


def _nearest(name: str, choices: Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {prefix + close[0]!r}?" if close else ""


def _check_value(key: str, tp: Any, value: Any, bounds: Mapping[str, float]) -> None:
    if typing.get_origin(tp) is typing.Literal:
        allowed = list(typing.get_args(tp))
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {allowed}")
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    for op, limit in bounds.items():
        ok = {"ge": value >= limit, "gt": value > limit, "le": value <= limit, "lt": value < limit}[op]
        if not ok:
            sign = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[op]
            raise ConfigError(f"{key}={value!r} must be {sign} {limit:g}")


def _build(cls: Type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            dotted, value = f"{prefix}{key}", data[key]
            while isinstance(value, Mapping) and len(value) == 1:  # +trainer.max_steps=3 arrives nested
                (leaf, value), = value.items()
                dotted += f".{leaf}"
            raise ConfigError(f"{dotted} is not a config key{_hint(dotted)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp, value, key = hints[f.name], data[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key} must be a group of keys, not {value!r}")
            value = _build(tp, value, key + ".")
        else:
            _check_value(key, tp, value, f.metadata.get("bounds", {}))
        kwargs[f.name] = value
    return cls(**kwargs)


def _sections(obj: Any, prefix: str = "") -> Iterable[Tuple[str, Any]]:
    yield prefix, obj
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _sections(value, f"{prefix}{f.name}.")


def validate(cfg: Config) -> Config:
    """Check every choice, bound and cross-field constraint of ``cfg``; raise ConfigError naming the key."""
    for prefix, section in _sections(cfg):
        hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            if not dataclasses.is_dataclass(hints[f.name]):
                _check_value(prefix + f.name, hints[f.name], getattr(section, f.name), f.metadata.get("bounds", {}))
        check = getattr(section, "check", None)
        if check is not None:
            check(cfg)
    return cfg


def upgrade(data: Mapping[str, Any]) -> Dict[str, Any]:
    """A config stored by an earlier version, in today's keys (checkpoints outlive the code):
    ``data.camera`` became ``camera``; ``model.field.class_conditioning`` was a bool; a config without
    ``data.holdout`` trained on every view."""
    data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    if isinstance(data.get("data"), dict) and "camera" in data["data"] and "camera" not in data:
        data["camera"] = data["data"].pop("camera")
    if isinstance(data.get("data"), dict) and "holdout" not in data["data"]:
        # runs before data.holdout trained on every view: none of them is held out
        data["data"] = {**data["data"], "holdout": {"every_k_azimuth": 0}}
    field = (data.get("model") or {}).get("field") if isinstance(data.get("model"), Mapping) else None
    if isinstance(field, Mapping) and isinstance(field.get("class_conditioning"), bool):
        data["model"] = {**data["model"], "field": {**field, "class_conditioning":
                                                     "add" if field["class_conditioning"] else "none"}}
    return data


def from_dict(data: Mapping[str, Any]) -> Config:
    """A validated Config from nested plain values (a composed config, a stored ``config.yaml``).

    Unknown keys fail naming the nearest real key; types are checked by OmegaConf against
    the schema; then :func:`validate`.
    """
    _build(Config, data, "")  # unknown keys first, with a "did you mean"
    try:
        typed = OmegaConf.merge(OmegaConf.structured(hydra_schema(Config)), data)
        container = OmegaConf.to_container(typed, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError(omegaconf_message(err)) from None
    return validate(_build(Config, container, ""))


def to_config(cfg: DictConfig | Mapping[str, Any] | Config) -> Config:
    """Turn a composed DictConfig (or plain nested values) into a validated Config."""
    if isinstance(cfg, Config):
        return validate(cfg)
    if isinstance(cfg, DictConfig):
        try:
            cfg = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except OmegaConfBaseException as err:
            raise ConfigError(omegaconf_message(err)) from None
    return from_dict(cfg)


# --------------------------------------------------------------------------- errors in one line


def omegaconf_message(err: OmegaConfBaseException) -> str:
    """One line naming the key for an OmegaConf error (missing value, wrong type, unknown key)."""
    key = getattr(err, "full_key", None) or ""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if type(err).__name__ == "MissingMandatoryValue":
        return f"{key} is required but has no value (set {key}=...)"
    if type(err).__name__ in ("ValidationError", "KeyValidationError") and key:
        value = getattr(err, "value", None)
        if value is not None and "Value" in text:
            return f"{key}={value!r} has the wrong type: {text}"
        return f"{key}: {text}"
    return f"{key}: {text}" if key else text


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


ALIASES = {
    "experiment": "+exp",
    "trainer.max_steps": "train.max_iters",
    "trainer.max_epochs": "train.max_iters",
    "trainer.devices": "train.device",
    "trainer.accelerator": "train.device",
    "trainer.precision": "train.amp.policy and train.amp.dtype",
    "trainer.accumulate_grad_batches": "train.grad_accum_steps",
    "ckpt_path": "resume",
    "tags": "tracking.tags",
    "seed": "train.seed",
    "logger": "tracking",
    "data.batch_size": "train.batch_size",
}
"""What a lightning-hydra-template (or PyTorch Lightning) user types first -> grafccsr's key."""


def group_options(group: str) -> list:
    """The options of a config group: the YAML files in ``conf/<group>/``."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def hydra_message(err: Exception, overrides: Sequence[str] = ()) -> str:
    """One line for a Hydra composition error (misspelt key, bad value, unknown group option)."""
    text = str(err)
    cause = err.__cause__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else type(err).__name__
    if first.startswith("Could not override '") or first.startswith("Could not append to config"):
        key = first.split("'")[1] if "'" in first else ""
        if isinstance(cause, OmegaConfBaseException) and "not in" not in str(cause):
            return omegaconf_message(cause) if getattr(cause, "full_key", None) else f"{key}: {str(cause).splitlines()[0]}"
        if group_options(key):  # a group that is not in the defaults list: presets are appended
            value = next((o.split("=", 1)[1] for o in overrides if _override_key(o) == key and "=" in o), "NAME")
            return f"{key}={value}: {key} is a preset group, appended with a '+': use +{key}={value}"
        return f"{key} is not a config key{_hint(key)}"
    if first.startswith("In '") and "Could not find" in text:
        missing = first.split("Could not find '")[1].split("'")[0] if "Could not find '" in first else ""
        group, _, name = missing.rpartition("/")
        options = group_options(group)
        if options:
            return (f"{group}={name} is not an option of {group}{_nearest(name, options, group + '=')} "
                    f"(options: {', '.join(options)})")
        return " ".join(lines[:2])
    if isinstance(cause, OmegaConfBaseException):
        return omegaconf_message(cause)
    return first


def _hint(dotted: str) -> str:
    """"; grafccsr calls it ..." for a name from lightning-hydra-template, else "did you mean"."""
    alias = ALIASES.get(dotted)
    if alias == "+exp":
        return f"; presets are +exp=NAME (options: {', '.join(group_options('exp'))})"
    if alias:
        return f"; grafccsr's key is {alias}"
    return _nearest_key(dotted)


def _nearest_key(dotted: str) -> str:
    """"did you mean" for a misspelt dotted key, searched in the schema."""
    parts = dotted.split(".")
    cls: Any = Config
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            return ""
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            close = difflib.get_close_matches(part, names, n=1, cutoff=0.5)
            return f"; did you mean {'.'.join(parts[:i] + [close[0]])!r}?" if close else ""
        cls = hints[part]
    return ""


# --------------------------------------------------------------------------- composing


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Hydra's compose API on ``conf/``; composition errors become one-line ConfigErrors."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    register_configs()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(hydra_message(err, overrides)) from None


def load_config(overrides: Optional[Sequence[str]] = None, config_name: str = "config") -> Config:
    """The validated Config for ``key=value`` overrides on ``conf/`` (every tool but training's CLI)."""
    return to_config(compose(list(overrides or []), config_name))


# --------------------------------------------------------------------------- using a Config


def to_dict(cfg: Config) -> Dict[str, Any]:
    """Nested plain values of a Config (for YAML, checkpoints, MLflow)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def flatten(cfg: Config | Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a.b.c": value}`` for every leaf (MLflow params)."""
    data = to_dict(cfg) if isinstance(cfg, Config) else cfg
    out: Dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_overrides(stored: Mapping[str, Any], overrides: Sequence[str]) -> Config:
    """A stored config (a run's ``config.yaml``, a checkpoint's) with ``key=value`` overrides on top.

    Values are parsed by Hydra's override grammar, as on the command line; group choices
    (``model=graf``) and presets (``+exp=...``) cannot apply to a resolved config and fail.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        raise ConfigError(hydra_message(err)) from None
    values: Dict[str, Any] = {}
    for override in parsed:
        key = override.key_or_group
        if override.is_delete() or override.is_sweep_override():
            raise ConfigError(f"{override.input_line}: only plain key=value overrides apply to a stored config")
        if "." not in key and key in {f.name for f in dataclasses.fields(Config)} and key not in ("exp_name", "output_dir", "resume"):
            raise ConfigError(f"{override.input_line}: a config group cannot change in a stored config; "
                              "set single keys (e.g. model.render.samples_per_ray=32)")
        if key.startswith("exp") and "." not in key:
            raise ConfigError(f"{override.input_line}: presets cannot apply to a stored config")
        values[key] = override.value()
    data = OmegaConf.to_container(OmegaConf.create(upgrade(stored)), resolve=True)
    return replace(from_dict(data), values)


def replace(cfg: Config, values: Mapping[str, Any]) -> Config:
    """A validated copy of ``cfg`` with dotted keys set (``{"train.batch_size": 4}``)."""
    data = to_dict(cfg)
    for dotted, value in values.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            if part not in node or not isinstance(node[part], dict):
                raise ConfigError(f"{dotted} is not a config key{_nearest_key(dotted)}")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"{dotted} is not a config key{_nearest_key(dotted)}")
        node[leaf] = value
    return from_dict(data)

