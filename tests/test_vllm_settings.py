"""The vLLM engine settings Looper derives, without vLLM (fast tier, any venv): the context
length from the prompts, the LoRA rank rounding, the engine keywords a pipeline file gives,
the conversion of vLLM's outputs to `Completion`s, and the TrainingArguments name for
activation checkpointing in whatever transformers is installed. vLLM's own classes check the
same keywords in tests/test_vllm_contract.py (GPU-stack venv)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from looper.config import ConfigError, EvalConfig, RolloutsConfig, build_config, read_pipeline_file
from looper.errors import LooperError
from looper.generation.vllm import (
    CPU_KV_CACHE_GIB,
    SUPPORTED_LORA_RANKS,
    completion_from_output,
    cpu_engine_settings,
    derive_max_model_len,
    engine_kwargs,
    supported_lora_rank,
)
from looper.policy import models, policies

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


@pytest.mark.parametrize(
    ("rank", "expected"),
    [(1, 1), (2, 8), (8, 8), (9, 16), (16, 16), (32, 32), (33, 64), (200, 256), (300, 320), (321, 512)],
)
def test_lora_rank_rounds_up_to_a_supported_one(rank, expected):
    assert supported_lora_rank(rank) == expected


def test_lora_rank_above_the_largest_is_refused():
    assert supported_lora_rank(512) == 512
    with pytest.raises(LooperError, match="LoRA rank 513 is above 512"):
        supported_lora_rank(513)


@pytest.mark.parametrize(
    ("prompt", "new", "limit", "expected"),
    [
        (100, 512, None, 768),  # 612 -> next multiple of 256
        (0, 256, None, 256),  # already a multiple
        (257, 2048, None, 2560),  # 2305 -> 2560
        (200, 2048, 2300, 2300),  # rounding stops at the model's own context
        (131072 - 4096, 4096, 131072, 131072),
    ],
)
def test_max_model_len_is_longest_prompt_plus_new_tokens_rounded_up(prompt, new, limit, expected):
    assert derive_max_model_len(prompt, new, limit) == expected


def test_max_model_len_beyond_the_model_is_refused():
    with pytest.raises(LooperError, match="300 tokens \\+ max_new_tokens 2048 = 2348 tokens exceeds"):
        derive_max_model_len(300, 2048, 2300)


def test_engine_kwargs_without_adapter():
    kwargs = engine_kwargs("org/model", adapter_rank=None, max_model_len=2560)
    assert kwargs == {
        "model": "org/model",
        "max_model_len": 2560,
        "gpu_memory_utilization": 0.85,
        "enforce_eager": False,
        "tensor_parallel_size": 1,
        "seed": 0,
        "dtype": "auto",
        "trust_remote_code": False,
        "logprobs_mode": "processed_logprobs",
    }


def test_cpu_engine_settings_only_on_a_cpu(monkeypatch):
    """The CPU-only settings: whole prefills (seeded requests on CPU), a step bounded to one
    context, an explicit KV cache (VLLM_CPU_KVCACHE_SPACE GiB when set); a GPU engine gets none."""
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    gpu = engine_kwargs("m", adapter_rank=None, max_model_len=768)
    cpu = engine_kwargs("m", adapter_rank=None, max_model_len=768, cpu=True)
    assert cpu == gpu | {
        "enable_chunked_prefill": False,
        "max_num_batched_tokens": 768,
        "kv_cache_memory_bytes": 2**30,
    }
    assert cpu_engine_settings(512)["kv_cache_memory_bytes"] == CPU_KV_CACHE_GIB * 2**30
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    assert cpu_engine_settings(512)["kv_cache_memory_bytes"] == 3 * 2**30


def test_vllm_generation_weights_record_the_dtype_that_runs(monkeypatch, tiny_model_dir):
    """generated_by for vLLM: the dtype resolved as for hf (float32 on a CPU, never 'auto'), the
    LoRA served as such, the vLLM build, and on a CPU the CPU-only engine settings."""
    monkeypatch.setattr(models, "has_cuda", lambda: False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    source = models.ModelSource("t", str(tiny_model_dir), "t")
    weights = policies.generation_weights("vllm", policies.Policy("sft", source, tiny_model_dir))
    assert weights["backend"] == "vllm" and weights["dtype"] == "float32" and weights["adapter"] == "lora"
    assert weights["cpu_engine"] == {
        "enable_chunked_prefill": False,
        "max_num_batched_tokens": "max_model_len",
        "kv_cache_memory_bytes": 2**30,
    }
    assert set(weights) == {"backend", "quant", "dtype", "adapter", "vllm", "cpu_engine"}
    monkeypatch.setattr(models, "has_cuda", lambda: True)
    weights = policies.generation_weights("vllm", policies.Policy("base", source), "float32")
    assert weights["dtype"] == "float32" and "cpu_engine" not in weights
    assert policies.generation_weights("vllm", policies.Policy("base", source))["dtype"] == "bfloat16"


def test_vllm_version_names_either_build(monkeypatch):
    from importlib import metadata

    from looper.generation import vllm as vllm_module

    installed = {"vllm-cpu": "0.32.0"}

    def version(name):
        if name not in installed:
            raise metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(vllm_module.metadata, "version", version)
    assert vllm_module.vllm_version() == "vllm-cpu 0.32.0"
    installed = {"vllm": "0.33.0"}
    assert vllm_module.vllm_version() == "vllm 0.33.0"
    installed = {}
    assert vllm_module.vllm_version() is None


@pytest.mark.parametrize(
    ("adapter", "configured", "expected"),
    [(32, None, 32), (12, None, 16), (4, None, 8), (32, 100, 128), (32, 32, 32), (320, None, 320)],
)
def test_engine_kwargs_lora_rank(adapter, configured, expected):
    kwargs = engine_kwargs("m", adapter_rank=adapter, max_model_len=512, max_lora_rank=configured)
    assert (kwargs["enable_lora"], kwargs["max_lora_rank"], kwargs["max_loras"]) == (True, expected, 1)


def test_configured_lora_rank_below_the_adapter_is_refused():
    with pytest.raises(LooperError, match="max_lora_rank 8 is below the adapter's rank 32"):
        engine_kwargs("m", adapter_rank=32, max_model_len=512, max_lora_rank=8)


def test_supported_ranks_are_sorted_and_distinct():
    assert list(SUPPORTED_LORA_RANKS) == sorted(set(SUPPORTED_LORA_RANKS))


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        (
            "gpu_memory_utilization",
            1.5,
            "[eval] gpu_memory_utilization: 1.5 is out of range: must be > 0 and <= 1",
        ),
        (
            "gpu_memory_utilization",
            0,
            "[eval] gpu_memory_utilization: 0 is out of range: must be > 0 and <= 1",
        ),
        ("max_lora_rank", 1024, "[eval] max_lora_rank: 1024 is out of range: must be >= 1 and <= 512"),
        ("tensor_parallel_size", 0, "[eval] tensor_parallel_size: 0 is out of range: must be >= 1"),
        ("max_model_len", 8, "[eval] max_model_len: 8 is out of range: must be >= 16"),
    ],
)
def test_engine_settings_are_range_checked(tmp_path, key, value, problem):
    path = tmp_path / "p.toml"
    path.write_text(f"[eval]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as err:
        build_config(EvalConfig, file_values=read_pipeline_file(path)["eval"], cli_values={})
    assert err.value.problems == [problem]


def test_engine_settings_from_a_pipeline_file_and_out_of_the_version(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(
        "[rollouts]\nmax_model_len = 4096\ngpu_memory_utilization = 0.7\nenforce_eager = true\n"
        "tensor_parallel_size = 2\nmax_lora_rank = 64\n"
    )
    config = build_config(RolloutsConfig, file_values=read_pipeline_file(path)["rollouts"], cli_values={})
    assert (config.max_model_len, config.gpu_memory_utilization, config.enforce_eager) == (4096, 0.7, True)
    assert (config.tensor_parallel_size, config.max_lora_rank) == (2, 64)
    # memory settings: lowering one after an out-of-memory resumes the same version
    from looper.config import identity

    default = build_config(RolloutsConfig, file_values={}, cli_values={})
    assert identity(config) == identity(default)


def test_engine_options_derive_the_context_from_the_stage_prompts(tiny_model_dir):
    """policies.vllm_engine_options, as rollouts and eval call it: the longest prompt tokenized
    the way the generator will, + max_new_tokens; the model's context caps it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = policies.Policy("base", models.ModelSource(str(tiny_model_dir), str(tiny_model_dir), "t"))
    prompts = ["short", "a much longer prompt " * 20]
    longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    config = build_config(RolloutsConfig, file_values={"max_new_tokens": 100}, cli_values={})
    limit = policies.model_context_limit(str(tiny_model_dir))
    assert limit is not None and limit > longest + 100
    options = policies.vllm_engine_options(config, policy, prompts, tokenizer, False)
    assert options["max_model_len"] == derive_max_model_len(longest, 100, limit)
    assert options["max_model_len"] >= longest + 100
    assert options["adapter_rank"] is None and options["gpu_memory_utilization"] == 0.85
    # set in the pipeline file: used as it is
    config = build_config(RolloutsConfig, file_values={"max_model_len": 999}, cli_values={})
    assert policies.vllm_engine_options(config, policy, prompts, tokenizer, False)["max_model_len"] == 999


def test_platinum_8b_engine_settings():
    """What the reference pipeline gives vLLM: a context sized for its own lengths, not 131072."""
    stages = read_pipeline_file(PIPELINES / "platinum-8b.toml")
    for stage, cls, new in (("rollouts", RolloutsConfig, 2048), ("eval", EvalConfig, 4096)):
        config = build_config(cls, file_values=stages[stage], cli_values={})
        assert config.backend == "vllm" and config.max_new_tokens == new
        kwargs = engine_kwargs(
            config.model,
            adapter_rank=32,
            max_model_len=derive_max_model_len(400, config.max_new_tokens, 131072),
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_lora_rank=config.max_lora_rank,
        )
        assert kwargs["max_model_len"] == new + 512 and kwargs["max_lora_rank"] == 32


def _logprobs(ids):
    return [{t: SimpleNamespace(logprob=-0.5 - k)} for k, t in enumerate(ids)]


def _out(ids, finish, stop_reason=None, text="text"):
    # the fields of vLLM's CompletionOutput that Looper reads (the contract test uses the real class)
    return SimpleNamespace(
        text=text, token_ids=ids, logprobs=_logprobs(ids), finish_reason=finish, stop_reason=stop_reason
    )


def test_completion_keeps_the_eos_that_ended_it():
    c = completion_from_output(_out([5, 6, 2], "stop"), eos_ids={2})
    assert (c.token_ids, c.logprobs, c.eos, c.tokens, c.finish_reason) == (
        [5, 6, 2],
        [-0.5, -1.5, -2.5],
        True,
        2,
        "stop",
    )


def test_completion_ending_on_a_generation_config_eos_id():
    # vLLM adds the generation config's extra EOS ids to the stop ids: stop_reason is the id
    c = completion_from_output(_out([5, 7], "stop", stop_reason=7), eos_ids={2})
    assert (c.token_ids, c.eos, c.tokens) == ([5, 7], True, 1)


def test_first_token_eos_is_one_stored_token():
    c = completion_from_output(_out([2], "stop", text=""), eos_ids={2})
    assert (c.token_ids, c.eos, c.tokens) == ([2], True, 0)


def test_length_and_stop_string_have_no_eos():
    c = completion_from_output(_out([5, 6, 7], "length"), eos_ids={2})
    assert (c.finish_reason, c.eos, c.tokens) == ("length", False, 3)
    c = completion_from_output(_out([5, 6], "stop", stop_reason="Question:", text="ab"), eos_ids={2})
    assert (c.finish_reason, c.eos, c.token_ids, c.text) == ("stop", False, [5, 6], "ab")


@pytest.mark.parametrize("reason", ["abort", "error"])
def test_abort_and_error_are_recorded_as_they_are(reason):
    c = completion_from_output(_out([5, 2], reason), eos_ids={2})
    assert (c.finish_reason, c.eos, c.tokens) == (reason, False, 2)


def test_missing_logprobs_are_an_error():
    out = _out([5, 6], "stop")
    out.logprobs = None
    with pytest.raises(LooperError, match="2 tokens but 0 log-probs"):
        completion_from_output(out, eos_ids={2})


def test_trainer_args_fit_the_installed_transformers(tmp_path):
    """sft/ppo/dpo's shared TrainingArguments build with this transformers (5.23+ names the
    option activation_checkpointing, older ones gradient_checkpointing)."""
    import dataclasses

    import transformers
    from transformers import TrainingArguments

    from looper.config import SftConfig
    from looper.train.runner import checkpointing_arg, trainer_args

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert checkpointing_arg() in names
    config = build_config(SftConfig, file_values={"gradient_checkpointing": True}, cli_values={})
    args = TrainingArguments(output_dir=str(tmp_path), **trainer_args(config, cuda=False))
    assert args.gradient_checkpointing is True, transformers.__version__


@pytest.mark.parametrize("name", ["gpu-smoke", "platinum-8b"])
def test_gpu_pipelines_build_every_stage(name):
    from looper.config import STAGE_CONFIGS

    stages = read_pipeline_file(PIPELINES / f"{name}.toml")
    configs = {s: build_config(c, file_values=stages[s], cli_values={}) for s, c in STAGE_CONFIGS.items()}
    assert configs["rollouts"].backend == configs["eval"].backend == "vllm"
    assert configs["sft"].quant == "4bit"
    # the s_cf arms must be among the arms rolled out
    from looper.regime_w.arms import select_arms

    arms = {a.name for a in select_arms(configs["rollouts"].arms, configs["rollouts"].arm_file)}
    assert set(configs["rollouts"].cf_arms.split(",")) <= arms


def test_eval_asks_vllm_for_no_logprobs_and_gets_none():
    # eval calls generate(logprobs=False): the request carries logprobs=None, vLLM returns none
    out = SimpleNamespace(text="t", token_ids=[5, 2], logprobs=None, finish_reason="stop", stop_reason=None)
    c = completion_from_output(out, eos_ids={2}, logprobs=False)
    assert (c.token_ids, c.logprobs, c.eos) == ([5, 2], [], True)
    with pytest.raises(LooperError, match="SamplingParams"):
        completion_from_output(out, eos_ids={2})
