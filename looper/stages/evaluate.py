"""`looper eval`: accuracy of several models on held-out GSM8K questions, compared pairwise.

    looper eval --compare base,sft,ppo                      # GSM8K test split, greedy
    looper eval --split dev --limit 50 --compare base,sft   # the quick check on dev questions
    looper eval --format lm-eval --compare base             # as lm-evaluation-harness' gsm8k (5-shot)
    looper eval --source hub:madrylab/gsm8k-platinum --compare base,ppo   # any GSM8K-shaped set
    looper eval --split gsm8k-platinum      # an extra split added by `looper prepare --extra-eval`
    looper eval --samples 8 --temperature 0.7 --compare sft # adds maj@8 and pass@8

What it does, in order:
1. turns each `--compare` name into a policy (`looper.policy.policies`): `base` is --model, `sft`,
   `ppo`, `dpo` the latest adapter of that stage (it must have been trained on --model),
   anything else a hub id, model directory or adapter path;
2. takes the questions (`looper.eval.questions`): the prepare artifact's test split (never
   trained on), its dev split, an extra evaluation split it holds (`looper prepare
   --extra-eval`), or any GSM8K-shaped `--source` (`looper.data.sources`:
   hub:<dataset>[:<config>][@<split>], a `datasets` directory, .jsonl or .parquet; bad rows
   stop the run or, with --skip-bad, are counted in the manifest), with a warning when some
   of its questions are in the prepare artifact's train/dev data;
3. builds prompts: `chat` renders the training prompt (the prepare rows' messages, or
   `tutoring_messages` for --source) with each model's chat template; `lm-eval` builds the
   harness's 5-shot plain-text prompt (`looper.data.lm_eval_format`);
4. generates, batched (hf on CPU, vLLM on GPU), one model at a time, freeing each before the
   next is loaded; scores with `looper.answers` (chat) or the harness's filters (lm-eval)
   (`looper.eval.completions`);
5. writes `data/eval/<version>/`: completions.parquet, report.json, report.md, accuracy.png,
   lengths.png (`looper.eval.report`). A rerun with the same settings and inputs is skipped.

Resume and reuse (`looper.eval.completions`): completions are cached per model in chunks of
CHUNK questions, `data/eval/cache/<key>/chunk-NNNNN.parquet`, each written atomically as it
finishes. The key hashes the policy identity, the exact prompts with their ids and gold
answers, the decoding settings, --samples, --format, --seed and the backend (and
--batch-size for hf, whose sampling seeds are per batch). An interrupted eval therefore
resumes at the chunk it was in (a chunk that does not read back whole is regenerated), and
`--compare base,sft,ppo` after `--compare base,sft` only generates for ppo.
Chunk c is generated with seed `--seed + c`. `--force` regenerates; deleting
data/eval/cache is always safe (it only costs regeneration).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import orjson

from looper.config import EvalConfig, identity
from looper.data import lm_eval_format
from looper.errors import LooperError
from looper.eval import report
from looper.eval.completions import CHUNK, ROW_SCHEMA, model_rows, progress_bar
from looper.eval.questions import build_prompts, fewshot_examples, load_questions
from looper.generation import Sampling
from looper.policy import models
from looper.policy.policies import ADAPTER_STAGES, Policy, choose_backend, resolve_policy, vllm_engine_about
from looper.stages import StageResult
from looper.store.artifacts import Artifact, Store, write_parquet

STAGE = "eval"
FORMATS = ("chat", "lm-eval")


def check_options(config: EvalConfig) -> list[str]:
    """The --compare names, after every check that needs no model or data."""
    if config.format not in FORMATS:
        raise LooperError(f"--format {config.format}: choose one of {', '.join(FORMATS)}")
    if config.source is None and config.split == "train":
        raise LooperError(
            "--split train: evaluate on test (never trained on), dev, or an extra evaluation split"
        )
    if config.samples < 1:
        raise LooperError(f"--samples {config.samples}: need at least 1 completion per question")
    if config.samples > 1 and config.temperature == 0:
        raise LooperError(
            f"--samples {config.samples} needs --temperature > 0 (greedy decoding repeats itself)"
        )
    if config.limit is not None and config.limit < 1:
        raise LooperError(f"--limit {config.limit}: nothing to evaluate")
    if config.bootstrap < 1:
        raise LooperError(f"--bootstrap {config.bootstrap}: need at least 1 resample")
    names = list(dict.fromkeys(n.strip() for n in config.compare.split(",") if n.strip()))
    if not names:
        raise LooperError("--compare is empty: name models, e.g. --compare base,sft")
    return names


def resolve_policies(
    names: list[str], store: Store, base: models.ModelSource, allow_base_mismatch: bool = False
) -> list[Policy]:
    policies = []
    for name in names:
        scheme = ":" in name.split("/", 1)[0]  # pkg:<package>/<file>, looper:tiny
        named = name == "base" or name in ADAPTER_STAGES or scheme or Path(name).expanduser().exists()
        if not named and (name.count("/") != 1 or name.startswith((".", "/", "~"))):
            raise LooperError(
                f"--compare: unknown model '{name}': use base, sft, ppo, dpo, a hub id "
                "(org/name), a model directory or an adapter path"
            )
        policies.append(resolve_policy(name, store=store, base=base, allow_base_mismatch=allow_base_mismatch))
    return policies


def run(config: EvalConfig) -> StageResult:
    names = check_options(config)
    stop = lm_eval_format.UNTIL if config.format == "lm-eval" else ()
    sampling = Sampling(
        temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens, stop=stop
    )
    store = Store(config.workdir, wait=config.wait)
    policies = resolve_policies(names, store, models.resolve_model(config.model), config.allow_base_mismatch)
    backend = choose_backend(config.backend)
    rows, inputs, prepare, about = load_questions(config, store)
    stage_identity = identity(config) | {
        "compare": ",".join(p.name for p in policies),  # an adapter path counts by <stage>:<version>
        "policies": {p.name: p.identity() for p in policies},
        "backend": backend,
        "chunk": CHUNK,
    }
    inputs |= {p.name: p.artifact for p in policies if p.artifact is not None and p.name in ADAPTER_STAGES}
    version = store.version_for(STAGE, stage_identity, inputs)
    if existing := store.reuse(STAGE, version, config.force):
        return StageResult.up_to_date(existing)

    shots, shots_note = fewshot_examples(prepare, rows) if config.format == "lm-eval" else ([], None)
    all_rows: list[dict] = []
    about_models: dict[str, dict] = {}
    with progress_bar() as progress:
        for policy in policies:
            prompts = build_prompts(policy, rows, config, shots)
            got, key = model_rows(
                policy, rows, prompts, config, sampling, backend, store.stage_root(STAGE) / "cache", progress
            )
            all_rows += got
            about_models[policy.name] = {
                "identity": policy.identity(),
                "cache_key": key,
                "prompt_example": prompts[0],
                "adapter": None if policy.adapter is None else store.relative(policy.adapter),
                "base_mismatch_allowed": policy.base_mismatch,
            }

    result = report.summarize(
        all_rows,
        [p.name for p in policies],
        fmt=config.format,
        samples=config.samples,
        bootstrap=config.bootstrap,
        seed=config.seed,
    )
    result = {
        "version": version,
        "settings": {
            "format": config.format,
            "questions_from": about["from"],
            "dataset": about["dataset"],
            "samples": config.samples,
            "temperature": config.temperature,
            "top_p": config.top_p,
            "max_new_tokens": config.max_new_tokens,
            "seed": config.seed,
            "backend": backend,
            "bootstrap": config.bootstrap,
        },
    } | result
    if config.format == "chat":
        instruction = rows[0]["prompt"][-1]["content"].rpartition("\n\nProblem: ")[0]  # as the rows have it
        prompt = {
            "format": "chat",
            "instruction": instruction,
            "messages_example": rows[0]["prompt"],
            "rendering": "messages through each model's chat template, assistant turn opened (render_prompt)",
        }
    else:
        prompt = {
            "format": "lm-eval",
            "conventions": lm_eval_format.CONVENTIONS,
            "fewshot_answers": shots_note,
            "fewshot_seed": lm_eval_format.FEWSHOT_SEED,
            "fewshot_ids_first_question": [s["id"] for s in shots[0]],
        }
    run_ = store.begin(STAGE, version)
    write_parquet(run_.path / "completions.parquet", all_rows, ROW_SCHEMA)
    report.write(run_.path, result, all_rows)
    counts = {
        "questions": len(rows),
        "models": len(policies),
        "samples": config.samples,
        "completions": len(all_rows),
    }
    if "skipped_bad" in about:
        counts["skipped_bad"] = about["skipped_bad"]
    if "overlap_with_training" in about:
        counts["overlap_with_training"] = about["overlap_with_training"]
    artifact = run_.commit(
        config=orjson.loads(orjson.dumps(vars(config))),
        inputs={name: a for name, a in inputs.items() if isinstance(a, Artifact)},
        identity=stage_identity,
        counts=counts,
        metrics=report.compact(result),
        extra={
            "questions": about,
            "prompt": prompt,
            "models": about_models,
            "generation": {
                "backend": backend,
                "dtype": models.resolve_dtype(config.dtype),  # the one both backends run
                **(vllm_engine_about() if backend == "vllm" else {}),
                "sampling": asdict(sampling),
                "samples": config.samples,
                "seed": config.seed,
                "chunk": CHUNK,
                "chunk_seed": "seed + chunk index",
            },
        },
    )
    return StageResult.from_artifact(artifact)
