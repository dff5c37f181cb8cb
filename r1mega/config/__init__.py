"""r1mega configuration: typed schema, loading with overrides, cross-field validation.

Everything a job needs is one :class:`R1MegaConfig`; :func:`load_config` builds it from
YAML files and ``key=value`` overrides and rejects mistakes with a :class:`ConfigError`
that names the dotted key, before any process group or GPU is touched.
"""

from r1mega.config.load import load_config, load_yaml_chain
from r1mega.config.schema import (
    CheckpointConfig,
    DataConfig,
    GRPOConfig,
    LaunchConfig,
    LayoutConfig,
    LoggingConfig,
    ModelConfig,
    PrecisionConfig,
    R1MegaConfig,
    RewardsConfig,
    RewardSpec,
    RolloutConfig,
    SlurmConfig,
    TokenizerConfig,
    TrainConfig,
)
from r1mega.config.validate import (
    ConfigError,
    data_parallel_size,
    expert_data_parallel_size,
    validate_config,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "GRPOConfig",
    "LaunchConfig",
    "LayoutConfig",
    "LoggingConfig",
    "ModelConfig",
    "PrecisionConfig",
    "R1MegaConfig",
    "RewardSpec",
    "RewardsConfig",
    "RolloutConfig",
    "SlurmConfig",
    "TokenizerConfig",
    "TrainConfig",
    "data_parallel_size",
    "expert_data_parallel_size",
    "load_config",
    "load_yaml_chain",
    "validate_config",
]
