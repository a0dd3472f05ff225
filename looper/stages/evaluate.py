"""`looper eval`: accuracy of several models on held-out GSM8K questions, compared pairwise.

    looper eval --compare base,sft,ppo                      # GSM8K test split, greedy
    looper eval --split dev --limit 50 --compare base,sft   # the quick check on dev questions
    looper eval --format lm-eval --compare base             # as lm-evaluation-harness' gsm8k (5-shot)
    looper eval --source hub:madrylab/gsm8k-platinum --compare base,ppo   # any GSM8K-shaped set
    looper eval --split gsm8k-platinum      # an extra split added by `looper prepare --extra-eval`
    looper eval --samples 8 --temperature 0.7 --compare sft # adds maj@8 and pass@8

What it does, in order:
1. turns each `--compare` name into a policy (`looper.policies`): `base` is --model, `sft`,
   `ppo`, `dpo` the latest adapter of that stage (it must have been trained on --model),
   anything else a hub id, model directory or adapter path;
2. takes the questions: the prepare artifact's test split (never trained on), its dev split,
   an extra evaluation split it holds (`looper prepare --extra-eval`), or any GSM8K-shaped
   `--source` (`looper.data.sources`: hub:<dataset>[:<config>][@<split>], a `datasets`
   directory, .jsonl or .parquet; bad rows stop the run or, with --skip-bad, are counted in
   the manifest), with a warning when some of its questions are in the prepare artifact's
   train/dev data;
3. builds prompts: `chat` renders the training prompt (the prepare rows' messages, or
   `tutoring_messages` for --source) with each model's chat template; `lm-eval` builds the
   harness's 5-shot plain-text prompt (`looper.data.lm_eval_format`);
4. generates, batched (hf on CPU, vLLM on GPU), one model at a time, freeing each before the
   next is loaded; scores with `looper.answers` (chat) or the harness's filters (lm-eval);
5. writes `data/eval/<version>/`: completions.parquet, report.json, report.md, accuracy.png,
   lengths.png (`looper.report`). A rerun with the same settings and inputs is skipped.

Resume and reuse: completions are cached per model in chunks of CHUNK questions,
`data/eval/cache/<key>/chunk-NNNNN.parquet`, each written atomically as it finishes. The key
hashes the policy identity, the exact prompts with their ids and gold answers, the decoding
settings, --samples, --format, --seed and the backend (and --batch-size for hf, whose
sampling seeds are per batch). An interrupted eval therefore resumes at the chunk it was
in (a chunk that does not read back whole is regenerated), and `--compare base,sft,ppo`
after `--compare base,sft` only generates for ppo.
Chunk c is generated with seed `--seed + c`. `--force` regenerates; deleting
data/eval/cache is always safe (it only costs regeneration).
"""

from __future__ import annotations

import gc
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import orjson
import pyarrow as pa
from rich.markup import escape

from looper import models, report
from looper.answers import extract_answer, is_correct
from looper.artifacts import Artifact, Store, read_rows, short_hash, write_parquet
from looper.config import EvalConfig, identity
from looper.data import gsm8k, lm_eval_format, sources
from looper.data.prompts import render_prompt, tutoring_messages
from looper.errors import LooperError
from looper.generation import Sampling
from looper.integrity import table_reads_back
from looper.policies import ADAPTER_STAGES, Policy, choose_backend, load_generator, resolve_policy
from looper.stages import StageResult

STAGE = "eval"
FORMATS = ("chat", "lm-eval")
CHUNK = 512  # questions per cache file: the unit of resume
CACHE_SCHEMA = 1

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("model", pa.string()),
        ("question", pa.string()),
        ("gold_answer", pa.string()),
        ("completion", pa.string()),
        ("answer", pa.string()),
        ("correct", pa.bool_()),
        ("tokens", pa.int32()),
        ("truncated", pa.bool_()),
        ("sample", pa.int32()),
    ]
)


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


def split_rows(prepare: Artifact, split: str) -> list[dict]:
    return read_rows(prepare.path / f"{split}.parquet")


def load_questions(config: EvalConfig, store: Store) -> tuple[list[dict], dict, Artifact | None, dict]:
    """(question rows, version inputs, prepare artifact if any, what the manifest says about them)."""
    if config.source is None:
        prepare = store.resolve("prepare", config.prepare)
        if not (prepare.path / f"{config.split}.parquet").is_file():
            present = sorted(p.stem for p in prepare.path.glob("*.parquet") if p.stem != "train")
            raise LooperError(
                f"--split {config.split}: prepare {prepare.version} has no such split (it has "
                f"{', '.join(present)}; add one with `looper prepare --extra-eval`)"
            )
        rows = split_rows(prepare, config.split)
        if not rows and config.split == "test":
            raise LooperError(
                f"prepare {prepare.version} has no test split (a single-file source has none): "
                "use --split dev, or --source FILE"
            )
        if not rows:
            raise LooperError(f"prepare {prepare.version} has an empty {config.split} split")
        rows = rows[: config.limit]
        return (
            rows,
            {"prepare": prepare},
            prepare,
            {
                "from": f"prepare {prepare.version} {config.split} split",
                "dataset": dataset_name(prepare, config.split),
                "prepare": prepare.version,
                "split": config.split,
            },
        )
    bad = gsm8k.BadRows()
    qset = sources.load(config.source, option="--source", skip_bad=config.skip_bad, bad=bad)
    raw = qset.rows[: config.limit]
    if not raw:
        raise LooperError(f"--source {config.source}: no questions")
    rows = [
        {
            "id": f"{qset.name}-{r.index:05d}",
            "question": r.question.strip(),
            "gold_answer": gsm8k.normalize_gold(r.answer),
            "prompt": tutoring_messages(r.question),
        }
        for r in raw
    ]
    digest = qset.about["rows_hash"]
    about = {
        "from": config.source,
        "dataset": qset.name,
        "source": qset.about,
        "skipped_bad": bad.count,
        "bad_rows": bad.examples,
    }
    try:
        prepare = store.resolve("prepare", config.prepare)
    except LooperError:
        if config.prepare not in (None, "", "latest"):
            raise
        if config.format == "lm-eval":
            raise LooperError(
                "--format lm-eval takes its 5 examples from a prepare artifact's train split: "
                "run `looper prepare` first"
            ) from None
        print(
            f"eval: warning: no prepare artifact under {store.workdir}: cannot check --source questions "
            "against the training data",
            file=sys.stderr,
        )
        return rows, {"source": digest}, None, about
    seen = {gsm8k.normalize_text(r["question"]) for s in ("train", "dev") for r in split_rows(prepare, s)}
    overlap = [r["id"] for r in rows if gsm8k.normalize_text(r["question"]) in seen]
    if overlap:
        print(
            f"eval: warning: {len(overlap)} of {len(rows)} questions in {config.source} also appear in the training "
            f"data (prepare {prepare.version} train/dev; e.g. {overlap[0]}): their accuracy is not held out",
            file=sys.stderr,
        )
    about |= {
        "prepare_checked": prepare.version,
        "overlap_with_training": len(overlap),
        "overlap_ids": overlap[:100],
    }
    inputs = {"source": digest} | ({"prepare": prepare} if config.format == "lm-eval" else {})
    return rows, inputs, prepare, about


def dataset_name(prepare: Artifact, split: str) -> str:
    """What a prepare split holds, for the report: 'gsm8k test', 'synthetic dev', 'gsm8k-platinum'."""
    if split in prepare.manifest.get("extra_eval", {}):
        return split
    return f"{prepare.manifest.get('source', {}).get('kind', 'prepare')} {split}"


def fewshot_examples(prepare: Artifact, rows: list[dict]) -> tuple[list[list[dict]], str]:
    """The harness's few-shot examples for each evaluated question, in order.

    lm-evaluation-harness' gsm8k task has no `fewshot_config`, so its default sampler draws
    `random.Random(1234).sample(train_docs, 5)` afresh for each document, in document order,
    from the whole train split in file order. We rebuild that pool from the prepare
    artifact's train and dev rows (sorted back into source order) and draw the same way, so
    the prompts are the harness's byte for byte when the pool is the full GSM8K train file."""
    index = lambda row: int(row["id"].rsplit("-", 1)[1])  # noqa: E731 - prepare ids end in the source row index
    evaluated = {r["id"] for r in rows}
    pool = sorted(
        (r for s in ("train", "dev") for r in split_rows(prepare, s) if r["id"] not in evaluated), key=index
    )
    if len(pool) < lm_eval_format.NUM_FEWSHOT:
        raise LooperError(
            f"prepare {prepare.version} has fewer than {lm_eval_format.NUM_FEWSHOT} train questions "
            "for --format lm-eval's examples"
        )
    raw = raw_train_rows(prepare)
    if raw is not None and all(
        index(r) in raw and raw[index(r)].question.strip() == r["question"] for r in pool
    ):
        pool, note = (
            [{"id": r["id"], "question": r["question"], "answer": raw[index(r)].answer} for r in pool],
            "raw",
        )
    else:
        pool = [{"id": r["id"], "question": r["question"], "answer": r["solution"]} for r in pool]
        note = "prepare solutions (<<...>> calculator annotations stripped; the harness keeps them)"
    rnd = random.Random(lm_eval_format.FEWSHOT_SEED)
    return [rnd.sample(pool, lm_eval_format.NUM_FEWSHOT) for _ in rows], note


def raw_train_rows(prepare: Artifact) -> dict[int, gsm8k.RawRow] | None:
    """The unmodified GSM8K train rows the prepare artifact was built from, when re-readable."""
    source = prepare.manifest.get("source", {})
    if source.get("kind") != "gsm8k":
        return None
    try:
        if source.get("spec") == "hub":
            rows = gsm8k.read_hub(prepare.manifest["config"]["dataset"], "train")
        else:
            path = Path(source["spec"]).expanduser()
            rows = gsm8k.read_jsonl(
                path / "train.jsonl" if path.is_dir() else path, skip_bad=True, bad=gsm8k.BadRows()
            )
    except (LooperError, OSError, KeyError):
        return None
    return {r.index: r for r in rows}


def build_prompts(policy: Policy, rows: list[dict], config: EvalConfig, shots: list[list[dict]]) -> list[str]:
    if config.format == "lm-eval":
        return [lm_eval_format.build_prompt(row_shots, r["question"]) for row_shots, r in zip(shots, rows)]
    tokenizer = models.load_tokenizer(policy.source, trust_remote_code=config.trust_remote_code)
    return [render_prompt(tokenizer, r["prompt"]) for r in rows]


def score(completion: str, gold: str, fmt: str) -> tuple[str | None, bool]:
    """(extracted answer or None, correct): looper's checker, or the harness's strict-match."""
    if fmt == "lm-eval":
        strict = lm_eval_format.strict_extract(completion)
        if strict == lm_eval_format.FALLBACK:
            return None, False
        return strict, lm_eval_format.exact_match(strict, gold)
    return extract_answer(completion), is_correct(completion, gold)


def progress_bar():
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("eval {task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} questions"),
        TextColumn("{task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )


def free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def model_rows(
    policy: Policy,
    rows: list[dict],
    prompts: list[str],
    config: EvalConfig,
    sampling: Sampling,
    backend: str,
    cache: Path,
    progress,
) -> tuple[list[dict], str]:
    """This policy's scored completions, from the cache where present, else generated chunk by chunk."""
    k = config.samples
    key = short_hash(
        {
            "schema": CACHE_SCHEMA,
            "chunk": CHUNK,
            "policy": policy.identity(),
            "format": config.format,
            "questions": short_hash([[r["id"], r["gold_answer"], p] for r, p in zip(rows, prompts)], n=64),
            "sampling": asdict(sampling),
            "samples": k,
            "seed": config.seed,
            "backend": backend,
            "batch_size": config.batch_size if backend == "hf" else None,
            "hf": [config.scheduler, config.dtype] if backend == "hf" else None,
        },
        n=16,
    )
    task = progress.add_task(escape(policy.name), total=len(rows), tps=0.0)
    out: list[dict] = []
    generator = None
    tokens, start = 0, time.perf_counter()
    cached = [] if config.force else sorted((cache / key).glob("chunk-*.parquet"))
    if cached:
        print(f"eval: {policy.name}: resuming from {len(cached)} cached chunk(s) in {cache / key}")
    try:
        for c, first in enumerate(range(0, len(rows), CHUNK)):
            chunk = rows[first : first + CHUNK]
            path = cache / key / f"chunk-{c:05d}.parquet"
            if not config.force and table_reads_back(path, STAGE):
                out += [r | {"model": policy.name} for r in read_rows(path)]
                progress.update(task, completed=first + len(chunk))
                continue
            if generator is None:
                generator, _ = load_generator(
                    policy,
                    backend=backend,
                    batch_size=config.batch_size,
                    trust_remote_code=config.trust_remote_code,
                    require_chat_template=config.format != "lm-eval",
                    scheduler=config.scheduler,
                    dtype=config.dtype,
                    options=config,
                    prompts=lambda _tokenizer: prompts,  # vLLM sizes its context for the longest
                )
                start = time.perf_counter()

            # start and tokens are read at call time on purpose: the running totals of this chunk
            def on_progress(done: int, new_tokens: int, first: int = first) -> None:
                elapsed = max(time.perf_counter() - start, 1e-9)  # noqa: B023
                progress.update(task, completed=first + done / k, tps=(tokens + new_tokens) / elapsed)  # noqa: B023

            completions = generator.generate(
                [p for p in prompts[first : first + CHUNK] for _ in range(k)],
                sampling,
                seed=config.seed + c,
                on_progress=on_progress,
                logprobs=False,  # scoring needs the text only: no per-token log-probs kept
            )
            tokens += sum(x.tokens for x in completions)
            scored = []
            for j, comp in enumerate(completions):
                question = chunk[j // k]
                answer, correct = score(comp.text, question["gold_answer"], config.format)
                scored.append(
                    {
                        "id": question["id"],
                        "model": policy.name,
                        "question": question["question"],
                        "gold_answer": question["gold_answer"],
                        "completion": comp.text,
                        "answer": answer,
                        "correct": correct,
                        "tokens": comp.tokens,
                        "truncated": comp.finish_reason == "length",
                        "sample": j % k,
                    }
                )
            write_parquet(path, scored, ROW_SCHEMA)
            out += scored
    finally:
        if generator is not None and callable(getattr(generator, "close", None)):
            generator.close()
        generator = None  # the last reference to the model: freed before the next one loads
        free_memory()
    return out, key


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
        names,
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
                "sampling": asdict(sampling),
                "samples": config.samples,
                "seed": config.seed,
                "chunk": CHUNK,
                "chunk_seed": "seed + chunk index",
            },
        },
    )
    return StageResult.from_artifact(artifact)
