"""One config tree for every entry point.

The CLI, YAML/JSON files and the Slurm templates all fill the same dataclasses
(``schema``); there is no second way to set a value. ``loading`` merges the packaged method
recipes (``--recipe``), then files, then ``--set section.key=value`` overrides, and checks the
result with ``checks`` (ranges and relations between keys); ``layers`` resolves
``trainable.layers`` against a model's layer count; ``args`` holds the command-line flags every
job command shares; ``commands`` is ``ear-dist config``.
"""

from ear_dist.config.args import add_config_args, config_from_args
from ear_dist.config.checks import ConfigError, get_key, validate
from ear_dist.config.loading import (
    config_yaml,
    example_configs,
    from_dict,
    load_config,
    parse_override,
    read_file,
    read_recipe,
    recipe_files,
    recipe_overrides,
    save_config,
)
from ear_dist.config.schema import (
    ConceptOverride,
    Config,
    DataConfig,
    DistConfig,
    EcgConfig,
    EraseConfig,
    EvalClassifierConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    PreserveConfig,
    RolloutConfig,
    ShardsConfig,
    SlurmConfig,
    TrainableConfig,
    TrainConfig,
    VfConfig,
    WorldConfig,
)

__all__ = [
    "ConceptOverride", "Config", "ConfigError", "DataConfig", "DistConfig", "EcgConfig", "EraseConfig",
    "EvalClassifierConfig", "EvalConfig",
    "ModelConfig", "OptimConfig", "PreserveConfig", "RolloutConfig", "ShardsConfig", "SlurmConfig", "TrainConfig",
    "TrainableConfig",
    "VfConfig", "WorldConfig", "add_config_args", "config_from_args", "config_yaml", "example_configs", "from_dict", "get_key",
    "load_config", "parse_override", "read_file", "read_recipe", "recipe_files", "recipe_overrides", "save_config",
    "validate",
]
