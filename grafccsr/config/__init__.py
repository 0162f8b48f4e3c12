"""Typed, validated configuration: the schema (``schema``) and how ``conf/`` becomes a Config (``load``)."""

from grafccsr.config.load import (
    apply_overrides,
    compose,
    flatten,
    from_dict,
    hydra_message,
    load_config,
    register_configs,
    replace,
    to_config,
    to_dict,
    to_yaml,
    validate,
)
from grafccsr.config.schema import (
    AmpConfig,
    CameraConfig,
    CCSRConfig,
    Config,
    ConfigError,
    DataConfig,
    DiscriminatorConfig,
    EvalConfig,
    FieldConfig,
    MemoryConfig,
    ModelConfig,
    PatchConfig,
    PoseConfig,
    RenderConfig,
    SyntheticConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "AmpConfig", "CameraConfig", "CCSRConfig", "Config", "ConfigError", "DataConfig", "DiscriminatorConfig",
    "EvalConfig", "FieldConfig", "MemoryConfig", "ModelConfig", "PatchConfig", "PoseConfig", "RenderConfig",
    "SyntheticConfig", "TrackingConfig", "TrainConfig",
    "apply_overrides", "compose", "flatten", "from_dict", "hydra_message", "load_config", "register_configs", "replace", "to_config",
    "to_dict", "to_yaml", "validate",
]
