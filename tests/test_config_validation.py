"""Every numeric option is range-checked and every closed-set option choice-checked where the
config is built: one line per problem, named as the option or the pipeline-file key."""

import pytest

from looper.config import (
    STAGE_CONFIGS,
    ConfigError,
    PpoConfig,
    PrepareConfig,
    RolloutsConfig,
    build_config,
    check,
)


def test_cli_values_are_named_as_options():
    with pytest.raises(ConfigError) as err:
        build_config(PrepareConfig, file_values={}, cli_values={"limit": -1})
    assert err.value.problems == ["--limit: -1 is out of range: must be >= 1"]


def test_file_values_are_named_as_stage_keys_and_all_problems_reported():
    with pytest.raises(ConfigError) as err:
        build_config(
            PpoConfig,
            file_values={"questions_per_minibatch": 0, "reward": "nonsense"},
            cli_values={"max_steps": -5},
        )
    assert sorted(err.value.problems) == [
        "--max-steps: -5 is out of range: must be >= 1",
        "[ppo] questions_per_minibatch: 0 is out of range: must be >= 1",
        "[ppo] reward: 'nonsense' is not one of arm, question, correctness",
    ]


@pytest.mark.parametrize(
    ("key", "value"),
    [("shard_size", -1), ("offset", -2), ("batch_size", 0), ("w_end", -0.1), ("backend", "tpu")],
)
def test_rollouts_rejects(key, value):
    assert len(check(RolloutsConfig, {key: value})) == 1


def test_none_means_unset_and_bounds_are_inclusive():
    assert check(RolloutsConfig, {"limit": None, "offset": 0, "w_end": 0.0}) == []


def test_every_default_is_accepted():
    for cls in STAGE_CONFIGS.values():
        build_config(cls, file_values={}, cli_values={})
