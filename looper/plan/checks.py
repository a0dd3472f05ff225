"""`looper --config PIPELINE plan`: check a pipeline before spending GPU hours on it.

    looper --config pipelines/platinum-8b.toml plan              # the visible GPU
    looper --config pipelines/platinum-8b.toml plan --gpu-gb 24  # planning for a 24 GiB card
    make all PIPELINE=...                                        # runs this first

In a few seconds, offline, no model loaded: (a) every stage's config is built from the file
and checked (unknown tables/keys, types, choices, ranges, and cross-field rules), one line
per problem naming `[stage] key`; (b) the environment: Python, torch and the visible CUDA
devices, bitsandbytes and vLLM where the pipeline needs them, free disk; (c) each stage's
peak GPU memory from the model's config.json (`looper.plan.memory`), as a table with the fit and
the setting to change. The whole table is printed, then the problems.

Exit 0 when everything is valid and fits; 1 otherwise. With no GPU visible and no
--gpu-gb the fit is unknown: that alone is not a failure (CPU pipelines run there), but a
stage that needs CUDA (vllm backend, 4bit quant) is. With --gpu-gb on a box without a GPU,
the checks of CUDA, bitsandbytes and vLLM are notes about this box, not problems.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from looper.config import DEFAULT_MODEL, STAGE_CONFIGS, field_problem, opt, parse_pipeline_file, stage_fields
from looper.errors import LooperError
from looper.generation import default_batch_size
from looper.plan import memory
from looper.plan.env import cross_field_problems, disk_check, environment, model_shapes, trl_fused_head
from looper.plan.memory import GIB, PROMPT_TOKENS, Shapes


@dataclass
class PlanConfig:
    pipeline: str | None = opt(None, "Pipeline file to check (the global --config).")
    gpu_gb: float | None = opt(
        None, "Plan for a GPU with this much memory in GiB (default: the visible GPU 0).", gt=0
    )
    model_config: str | None = opt(
        None, "The model's config.json (default: hub cache, local model dir, or built-in shapes)."
    )
    workdir: str = opt(".", "Directory the artifacts go to, for the disk check (env LOOPER_HOME).")
    json: bool = opt(False, "Print one JSON object with the table and problems as the last stdout line.")


@dataclass
class Row:
    stage: str
    estimate: float | None  # bytes; None: nothing to estimate from (see `what`)
    breakdown: dict[str, float]
    what: str = ""  # the settings the estimate is for
    fits: bool | None = None
    change: str = "-"
    limit: float | None = None  # bytes this stage may use (vLLM: gpu_memory_utilization x card)


def run(config: PlanConfig) -> int:
    """Print the plan; returns the exit code (0: valid and fits)."""
    if not config.pipeline:
        raise LooperError("plan needs a pipeline file: looper --config pipelines/<name>.toml plan")
    values, problems = parse_pipeline_file(config.pipeline)
    raw = tomllib.loads(Path(config.pipeline).read_text())  # parsed above: valid TOML
    stages = {}
    for stage, cls in STAGE_CONFIGS.items():
        bad = {
            key: why
            for key, value in values[stage].items()
            if (why := field_problem(stage_fields(cls)[key], value))
        }
        for key, why in bad.items():
            # a [common] value the stage does not override is named (once) where the user wrote it
            line = f"[{'common' if key not in raw.get(stage, {}) else stage}] {key}: {why}"
            problems += [] if line in problems else [line]
        if not bad:
            stages[stage] = cls(**values[stage])
    problems += cross_field_problems(stages)
    env, env_problems, notes, gpu = environment(config, stages)
    problems += env_problems
    # the model the stages load: [common] model usually (a stage's own table may name another)
    model = next((v["model"] for v in values.values() if "model" in v), DEFAULT_MODEL)
    shapes, where = model_shapes(config, model)
    names = planned_stages(raw, stages)
    if isinstance(shapes, str):  # the whole table still, with nothing estimated
        problems.append(shapes)
        rows = [Row(n, None, {}, "no model shapes", change="--model-config PATH") for n in names]
    else:
        fused = trl_fused_head()
        notes.insert(0, f"model: {where}, {shapes.params() / 1e9:.2f} B parameters")
        notes.append(f"logits: {'TRL fused LM head (tiles)' if fused else 'full (no TRL fused LM head)'}")
        rows = estimate_all(stages, names, shapes, gpu, problems, fused_logits=fused)
        disk_lines, disk_problems = disk_check(config, stages, model, shapes)
        env += disk_lines
        problems += disk_problems
    report(config, env + notes, rows, problems, gpu)
    return 1 if problems else 0  # a stage that does not fit is one of the problems


PIPELINE_STAGES = ("prepare", "sft", "rollouts", "ppo", "eval")  # what `make all` runs


def planned_stages(raw: dict[str, Any], stages: dict[str, Any]) -> list[str]:
    """`make all`'s stages, and dpo when the file configures it (a [dpo] table or loop algorithm)."""
    loop = stages.get("loop")
    dpo = "dpo" in raw or (loop is not None and loop.algorithm == "dpo")
    return [*PIPELINE_STAGES, *(["dpo"] if dpo else [])]


def estimate_all(
    stages, names: list[str], shapes: Shapes, gpu: float | None, problems: list[str], *, fused_logits: bool
) -> list[Row]:
    """The table's rows; a stage that does not fit adds a line to `problems`."""
    rows = []
    for name in names:
        if name not in stages:  # its problems are listed; nothing to estimate from
            rows.append(Row(name, None, {}, "invalid config", change=f"fix the [{name}] problems below"))
            continue
        row = estimate(name, stages, shapes, fused_logits)
        rows.append(row)
        if not row.estimate:
            row.fits = True  # no GPU used
        if gpu is not None and row.estimate:
            limit = gpu * row.limit if row.limit else gpu
            row.fits = row.estimate <= limit
            if not row.fits:
                row.change = suggest(name, stages, shapes, fused_logits, gpu)
                problems.append(
                    f"[{name}] memory: about {row.estimate / GIB:.1f} GiB does not fit "
                    f"{limit / GIB:.1f} GiB; change: {row.change}"
                )
    return rows


def estimate(name: str, stages: dict[str, Any], shapes: Shapes, fused: bool) -> Row:
    """One stage's peak (bytes) with its breakdown; `limit` the fraction of the card it may use."""
    if name == "prepare":
        return Row(name, 0.0, {}, "no model")
    if name in ("sft", "ppo", "dpo"):
        return training_estimate(name, stages, shapes, fused)
    cfg = stages[name]
    prompt = PROMPT_TOKENS.get(getattr(cfg, "format", "chat"), PROMPT_TOKENS["chat"])
    if _is_vllm(cfg):
        max_len = getattr(cfg, "max_model_len", None)
        if max_len is None:  # derived from prompt + new tokens where the field exists, else vLLM's default
            max_len = prompt + cfg.max_new_tokens if hasattr(cfg, "max_model_len") else shapes.max_positions
        rank = stages["sft"].lora_r if "sft" in stages else 32
        parts = memory.vllm_peak(shapes, max_model_len=max_len, lora_rank=max(16, rank))
        util = getattr(cfg, "gpu_memory_utilization", None) or 0.85  # VLLMGenerator's default
        return Row(name, sum(parts.values()), parts, f"vllm, max_model_len {max_len}", limit=util)
    seq = prompt + cfg.max_new_tokens
    batch = cfg.batch_size or default_batch_size(cfg.scheduler, "cuda")  # plans are for a GPU
    parts = memory.hf_generate_peak(shapes, batch=batch, seq=seq)
    return Row(name, sum(parts.values()), parts, f"hf generate, {batch} x {seq} tokens")


def training_estimate(name: str, stages: dict[str, Any], shapes: Shapes, fused: bool) -> Row:
    cfg, sft, ro = stages[name], stages.get("sft"), stages.get("rollouts")
    quant = "4bit" if cfg.quant == "auto" else cfg.quant  # a CUDA box's resolution of 'auto'
    from_sft = name != "sft" and sft is not None and ro is not None and ro.policy == "sft"
    lora_cfg = sft if from_sft else cfg  # ppo/dpo continue sft's adapter when the rollouts came from it
    lora = memory.lora_params(shapes, lora_cfg.lora_r, lora_cfg.target_modules)
    # ppo runs with TRL's disable_dropout: LoRA keeps no dropout copies of its inputs there
    dropout = 0.0 if name == "ppo" else lora_cfg.lora_dropout
    per_token = memory.activation_bytes_per_token_layer(
        shapes, lora_cfg.lora_r, lora_cfg.target_modules, dropout
    )
    prompt, new_tokens = PROMPT_TOKENS["chat"], ro.max_new_tokens if ro else 512
    if name == "sft":
        batch, seq = cfg.batch_size, cfg.max_length
    elif name == "ppo" and cfg.online:
        batch, seq = cfg.questions_per_minibatch * cfg.online_generations, prompt + cfg.max_new_tokens
    elif name == "ppo":  # one minibatch: every arm of questions_per_minibatch questions
        batch, seq = cfg.questions_per_minibatch * (ro.arms if ro else 8), prompt + new_tokens
    else:
        batch, seq = 2 * cfg.batch_size, prompt + new_tokens  # chosen and rejected
    parts = memory.training_peak(
        shapes,
        quant=quant,
        optimizer=cfg.optimizer,
        lora=lora,
        batch=batch,
        seq=seq,
        checkpointing=cfg.gradient_checkpointing,
        per_token_layer=per_token,
        fused_logits=fused,
        reference_lora=lora if from_sft else 0,  # TRL's frozen 'ref' copy of the adapter
    )
    if name == "ppo" and cfg.online:  # TRL generates the group with the training model (HF generate)
        sampling = memory.hf_generate_peak(shapes, batch=batch, seq=seq)
        parts["activations+logits"] = max(
            parts["activations+logits"], sampling["kv-cache"] + sampling["logits"]
        )
    ckpt = "checkpointing" if cfg.gradient_checkpointing else "no checkpointing"
    what = f"{quant}, {batch} x {seq} tokens, {ckpt}, {'fused' if fused else 'full'} logits"
    return Row(name, sum(parts.values()), parts, what)


# Settings tried, in order and cumulatively, until a stage fits: (table, key, candidate values).
def _halvings(value: int, floor: int) -> list[int]:
    out = []
    while value // 2 >= floor:
        value //= 2
        out.append(value)
    return out


def suggest(name: str, stages: dict[str, Any], shapes: Shapes, fused: bool, gpu: float) -> str:
    cfg, ro = stages[name], stages.get("rollouts")
    steps: list[tuple[str, str, list[Any]]] = []
    if name == "sft":
        steps = [
            ("sft", "batch_size", _halvings(cfg.batch_size, 1)),
            ("sft", "gradient_checkpointing", [True]),
        ]
        steps += [("sft", "max_length", _halvings(cfg.max_length, 256)), ("sft", "quant", ["4bit"])]
    elif name in ("ppo", "dpo"):
        if name == "ppo":
            q = cfg.questions_per_minibatch
            steps = [
                (
                    "ppo",
                    "questions_per_minibatch",
                    [d for d in range(q - 1, 0, -1) if cfg.questions_per_step % d == 0],
                )
            ]
        else:
            steps = [("dpo", "batch_size", _halvings(cfg.batch_size, 1))]
        steps += [(name, "gradient_checkpointing", [True]), (name, "quant", ["4bit"])]
        if ro:
            steps.append(("rollouts", "max_new_tokens", _halvings(ro.max_new_tokens, 256)))
    elif _is_vllm(cfg) and not hasattr(cfg, "max_model_len"):
        return "max_model_len (not settable in this Looper): vLLM reserves the model's whole context"
    elif _is_vllm(cfg):
        steps = [
            (name, "gpu_memory_utilization", [0.9, 0.95]),
            (name, "max_new_tokens", _halvings(cfg.max_new_tokens, 256)),
        ]
    else:
        steps = [
            (name, "batch_size", _halvings(cfg.batch_size or default_batch_size(cfg.scheduler, "cuda"), 1)),
            (name, "max_new_tokens", _halvings(cfg.max_new_tokens, 256)),
        ]
    changed: dict[tuple[str, str], Any] = {}
    trial, best = dict(stages), estimate(name, stages, shapes, fused)
    for table, key, candidates in steps:
        for value in candidates:
            attempt = dict(trial)
            attempt[table] = dataclasses.replace(trial[table], **{key: value})
            row = estimate(name, attempt, shapes, fused)
            if row.estimate >= best.estimate:
                continue  # no saving (e.g. quant 'auto' already is 4bit on CUDA): not worth naming
            trial, best, changed[(table, key)] = attempt, row, value
            if row.estimate <= gpu * (row.limit or 1):
                return ", ".join(f"[{t}] {k} = {orjson.dumps(v).decode()}" for (t, k), v in changed.items())
    tried = ", ".join(f"[{t}] {k} = {orjson.dumps(v).decode()}" for (t, k), v in changed.items())
    need = math.ceil(best.estimate / (best.limit or 1) / GIB)
    return f"a GPU of >= {need} GiB, even with {tried or 'these settings'}"


def _is_vllm(cfg: Any) -> bool:
    return cfg.backend == "vllm" or (cfg.backend == "auto" and importlib.util.find_spec("vllm") is not None)


def report(
    config: PlanConfig, lines: list[str], rows: list[Row], problems: list[str], gpu: float | None
) -> None:
    print(f"plan for {config.pipeline}")
    for line in lines:
        print(f"  {line}")
    card = f"{gpu / GIB:.0f} GiB" if gpu else "unknown"
    print(f"\n{'stage':<9} {'estimate':>10}  {'fit (' + card + ')':<24} change")
    for r in rows:
        if r.estimate is None:
            print(f"{r.stage:<9} {'-':>10}  {r.what:<24} {r.change}")
            continue
        fit = {None: "unknown (no GPU)", True: "fits"}.get(r.fits, "DOES NOT FIT")
        fit = "no GPU used" if not r.estimate else fit
        if r.limit and r.fits is not None:
            fit += f" (at {r.limit}x)"  # vLLM may use gpu_memory_utilization x the card
        print(f"{r.stage:<9} {r.estimate / GIB:>6.1f} GiB  {fit:<24} {r.change}")
    for r in rows:
        if r.breakdown:
            parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in r.breakdown.items())
            print(f"  {r.stage} ({r.what}): {parts} GiB")
    print(f"\n{len(problems)} problem(s)" + (":" if problems else ""))
    for p in problems:
        print(f"  {p}")
    if config.json:
        stages = [
            {
                "stage": r.stage,
                "estimate_gib": None if r.estimate is None else round(r.estimate / GIB, 2),
                "fits": r.fits,
                "change": r.change,
            }
            for r in rows
        ]
        print(
            orjson.dumps(
                {"stages": stages, "problems": problems, "gpu_gib": gpu and round(gpu / GIB, 2)}
            ).decode()
        )
