"""`looper eval --format lm-eval` against lm-evaluation-harness' gsm8k: accuracy agreement and wall-clock.

    # once, if the python running this has no `lm_eval` next to it: the harness in its own venv
    python -m venv bench/.lmeval-venv
    bench/.lmeval-venv/bin/pip install lm-eval torch==2.13.0 transformers==5.24.0 accelerate==1.15.0 peft==0.21.2

    .venv/bin/python bench/bench_eval_lmeval.py [--limit 100] [--batch-size 16] [--max-new-tokens 256]
        [--scheduler continuous] [--also-static] [--bf16-check] [--first-n-check]

The harness is taken from the running interpreter's venv (`lm_eval` next to `sys.executable`,
e.g. `pip install lm-eval` into .venv) if there, else from bench/.lmeval-venv. looper runs as
`python -m looper` with this checkout first on PYTHONPATH (the code of this tree, not an
installed copy).

SmolLM2-135M-Instruct (the GGUF, converted once by looper; lm-eval gets that safetensors directory
as `pretrained=`), float32, CPU, greedy, the first `--limit` GSM8K test questions of the shared
local copy (`../shared/gsm8k`), 5-shot with the harness' default random examples (looper draws
the same ones: `fewshot_examples`), batch 16, at most 256 new tokens (`--max-new-tokens` N other
than 256 passes `--gen_kwargs max_gen_toks=N` to the harness, for short check runs).

* lm-eval: `lm_eval run --model hf --tasks gsm8k_local --num_fewshot 5 --limit N --log_samples`.
  `gsm8k_local` is the installed harness' own `lm_eval/tasks/gsm8k/gsm8k.yaml`, copied line for
  line by this script into `bench/lmeval/gsm8k_local.yaml` with only the task name and the dataset
  lines changed (`dataset_path: json` + `data_files` on the local copy, absolute paths, so the
  file is regenerated on every run) and the grouping `tag:` dropped.
* looper: `looper prepare --source <local copy>` (not timed), then
  `looper eval --format lm-eval --compare base --limit N --max-new-tokens 256 --backend hf`.

Each side is timed as the wall-clock of its whole command (interpreter start, imports, model load,
generation, scoring, writing results). Then: both filters' accuracies (looper's with its Wilson
95% interval), the questions whose extracted answers differ (harness `filtered_resps` from the
samples file against looper's completions.parquet: `answer` holds the strict-match answer,
flexible-extract is recomputed from `completion`, as looper's report does), completions and
prompts that differ byte for byte. Each differing completion is explained: both completions are
tokenized, and the model (float32, alone, batch 1) is run on the prompt plus their common token
prefix; the top-2 logit gap there is printed (a flip is a near-tie when it is < 1e-4).

`--also-static` also times `looper eval --scheduler static` (the pre-continuous path);
`--bf16-check` also times `looper eval --dtype bfloat16` and counts the answers that change
against float32 looper's.

`--first-n-check` also runs the harness with a second local task, `gsm8k_local_first_n`: the same
YAML plus `fewshot_config: {sampler: first_n}`, the few-shot sampler looper's lm-eval format
assumes (the installed gsm8k.yaml has no fewshot_config, so the harness draws 5 random train
examples per question with its fewshot seed 1234), to separate that difference from the rest.
Outputs go to bench/out/eval_lmeval/<time>/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import SMOLLM, machine

from looper.data import lm_eval_format
from looper.store.artifacts import read_rows

ROOT = Path(__file__).resolve().parents[1]
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "gsm8k"
LMEVAL_VENV = ROOT / "bench" / ".lmeval-venv"
LMEVAL_BIN = next(
    (b for b in (Path(sys.executable).parent, LMEVAL_VENV / "bin") if (b / "lm_eval").is_file()),
    LMEVAL_VENV / "bin",
)
TASK_DIR = ROOT / "bench" / "lmeval"
TASK, TASK_FIRST_N = "gsm8k_local", "gsm8k_local_first_n"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def harness_yaml() -> tuple[Path, str]:
    """The installed harness' gsm8k.yaml (path, text)."""
    code = "import importlib.util,os;print(os.path.dirname(importlib.util.find_spec('lm_eval').origin))"
    out = subprocess.run([str(LMEVAL_BIN / "python"), "-c", code], capture_output=True, text=True, check=True)
    path = Path(out.stdout.strip()) / "tasks" / "gsm8k" / "gsm8k.yaml"
    return path, path.read_text()


def write_tasks() -> dict[str, Path]:
    """bench/lmeval/gsm8k_local.yaml (+ the first_n variant): the harness' file with the local data."""
    source, text = harness_yaml()
    lines = text.splitlines()

    def replace(prefix: str, new: list[str]) -> None:
        hits = [i for i, line in enumerate(lines) if line.startswith(prefix)]
        if len(hits) != 1:
            raise SystemExit(
                f"{source}: expected one line starting {prefix!r}, found {len(hits)}: "
                "the harness' gsm8k.yaml changed, update write_tasks()"
            )
        lines[hits[0] : hits[0] + 1] = new

    if lines[:2] != ["tag:", "  - math_word_problems"]:
        raise SystemExit(f"{source}: unexpected tag block {lines[:2]}")
    del lines[:2]  # grouping only: keep the local copies out of the harness' math_word_problems tag
    replace("task: gsm8k", [f"task: {TASK}"])
    replace("dataset_path: openai/gsm8k", ["dataset_path: json"])
    replace(
        "dataset_name: main",
        [
            "dataset_name: null",
            "dataset_kwargs:",
            "  data_files:",
            f"    train: {json.dumps(str(GSM8K / 'train.jsonl'))}",
            f"    test: {json.dumps(str(GSM8K / 'test.jsonl'))}",
        ],
    )
    if any(line.startswith("fewshot_config") for line in lines):
        raise SystemExit(f"{source} has a fewshot_config now: revisit the first_n variant")
    header = [
        f"# Generated by bench/bench_eval_lmeval.py from {source.relative_to(ROOT) if source.is_relative_to(ROOT) else source}:",
        "# the harness' gsm8k task on the local GSM8K copy; everything else as in that file. Do not edit.",
    ]
    TASK_DIR.mkdir(exist_ok=True)
    paths = {TASK: TASK_DIR / f"{TASK}.yaml", TASK_FIRST_N: TASK_DIR / f"{TASK_FIRST_N}.yaml"}
    paths[TASK].write_text("\n".join(header + lines) + "\n")
    first_n = [line.replace(f"task: {TASK}", f"task: {TASK_FIRST_N}") for line in lines]
    paths[TASK_FIRST_N].write_text(
        "\n".join(
            header[:1]
            + [
                "# DIAGNOSTIC variant: + fewshot_config sampler first_n (what looper's lm-eval format assumes)."
            ]
            + first_n
            + ["fewshot_config:", "  sampler: first_n"]
        )
        + "\n"
    )
    return paths


def timed(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, str]:
    """Wall-clock seconds of the whole command, and its stdout; stderr goes to `log`."""
    started = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.run(
            cmd,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=ROOT,
            env=os.environ | OFFLINE | {"PYTHONPATH": str(ROOT)} | (env or {}),
        )
    seconds = time.perf_counter() - started
    if proc.returncode:
        sys.stdout.write(proc.stdout[-3000:])
        raise SystemExit(f"{cmd[0]} exited {proc.returncode}: see {log}")
    return seconds, proc.stdout


def run_lmeval(
    task: str, model_dir: str, out: Path, limit: int, batch_size: int, max_new_tokens: int
) -> tuple[float, dict, dict]:
    """(seconds, results[task], {doc_id: {filter: sample}})."""
    cmd = [
        str(LMEVAL_BIN / "lm_eval"),
        "run",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model_dir},dtype=float32",
        "--tasks",
        task,
        "--num_fewshot",
        "5",
        "--limit",
        str(limit),
        "--batch_size",
        str(batch_size),
        "--log_samples",
        "--device",
        "cpu",
        "--include_path",
        str(TASK_DIR),
        "--output_path",
        str(out),
    ]
    if max_new_tokens != lm_eval_format.MAX_GEN_TOKS:
        cmd += ["--gen_kwargs", f"max_gen_toks={max_new_tokens}"]
    print("$", " ".join(cmd), flush=True)
    seconds, _ = timed(cmd, out.with_suffix(".log"))
    (results_file,) = out.rglob("results_*.json")
    (samples_file,) = out.rglob(f"samples_{task}_[0-9]*.jsonl")  # not gsm8k_local_first_n's for gsm8k_local
    results = json.loads(results_file.read_text())["results"][task]
    samples: dict[int, dict] = {}
    for line in samples_file.read_text().splitlines():
        s = json.loads(line)
        samples.setdefault(s["doc_id"], {})[s["filter"]] = s
    return seconds, results, samples


def run_looper(
    workdir: Path, limit: int, batch_size: int, max_new_tokens: int, *extra: str
) -> tuple[float, dict]:
    cmd = [
        sys.executable,
        "-m",
        "looper",
        "eval",
        "--workdir",
        str(workdir),
        "--model",
        SMOLLM,
        "--compare",
        "base",
        "--format",
        "lm-eval",
        "--limit",
        str(limit),
        "--max-new-tokens",
        str(max_new_tokens),
        "--batch-size",
        str(batch_size),
        "--backend",
        "hf",
        "--force",  # no cached chunk from an earlier run of another variant
        "--json",
        *extra,
    ]
    print("$", " ".join(cmd), flush=True)
    seconds, stdout = timed(cmd, workdir.parent / f"looper-eval{'-'.join(['', *extra])}.log")
    return seconds, json.loads(stdout.strip().splitlines()[-1])


def harness_parts(sample: dict) -> tuple[str, str, str]:
    """(prompt, completion, filtered answer) of one logged harness sample."""
    args = sample["arguments"]
    prompt = args["gen_args_0"]["arg_0"] if isinstance(args, dict) else args[0][0]
    resp = sample["resps"][0]
    completion = resp[0] if isinstance(resp, list) else resp
    answer = sample["filtered_resps"][0]
    return prompt, completion, answer[0] if isinstance(answer, list) else answer


def compare(
    label: str, samples: dict, results: dict, looper_rows: list[dict], looper_prompts: list[str], report: dict
) -> dict:
    """Print and return the agreement figures of one harness run against looper's."""
    from looper.data import lm_eval_format as fmt

    n = len(looper_rows)
    if sorted(samples) != list(range(n)):
        raise SystemExit(f"{label}: harness doc_ids {sorted(samples)[:5]}... are not 0..{n - 1}")
    ids_ok = all(
        r["id"] == f"gsm8k-test-{i:05d}"
        and samples[i]["strict-match"]["doc"]["question"].strip() == r["question"]
        for i, r in enumerate(looper_rows)
    )
    diff = {
        "strict": [],
        "flexible": [],
        "completion": [],
        "prompt": [],
        "correct_strict": [],
        "correct_flexible": [],
    }
    for i, row in enumerate(looper_rows):
        prompt, completion, strict = harness_parts(samples[i]["strict-match"])
        flexible = harness_parts(samples[i]["flexible-extract"])[2]
        ours_strict = fmt.FALLBACK if row["answer"] is None else row["answer"]
        ours_flexible = fmt.flexible_extract(row["completion"])
        if strict != ours_strict:
            diff["strict"].append(i)
        if flexible != ours_flexible:
            diff["flexible"].append(i)
        if completion != row["completion"]:
            diff["completion"].append(i)
        if prompt != looper_prompts[i]:
            diff["prompt"].append(i)
        if bool(samples[i]["strict-match"]["exact_match"]) != row["correct"]:
            diff["correct_strict"].append(i)
        if bool(samples[i]["flexible-extract"]["exact_match"]) != fmt.exact_match(
            ours_flexible, row["gold_answer"]
        ):
            diff["correct_flexible"].append(i)
    base = report["models"]["base"]
    acc = {
        "strict-match": (results["exact_match,strict-match"], base["accuracy"], base["ci95"]),
        "flexible-extract": (
            results["exact_match,flexible-extract"],
            base["flexible"]["accuracy"],
            base["flexible"]["ci95"],
        ),
    }
    print(f"--- lm-eval task {label} vs looper ---")
    print(
        f"question ids match (looper gsm8k-test-00000.. = harness doc_id 0.., same question text): {ids_ok}"
    )
    for name, (theirs, ours, (low, high)) in acc.items():
        inside = low <= theirs <= high
        print(
            f"{name:16s}: lm-eval {theirs:.4f} (stderr {results[f'exact_match_stderr,{name}']:.4f}), "
            f"looper {ours:.4f} [Wilson 95% {low:.4f}, {high:.4f}]  lm-eval inside looper's interval: {inside}"
        )
    print(f"prompts differing byte for byte:      {len(diff['prompt'])}/{n}  {diff['prompt'][:20]}")
    print(f"completions differing:                {len(diff['completion'])}/{n}  {diff['completion'][:20]}")
    print(f"strict-match answers differing:       {len(diff['strict'])}/{n}  {diff['strict'][:20]}")
    print(f"flexible-extract answers differing:   {len(diff['flexible'])}/{n}  {diff['flexible'][:20]}")
    print(f"strict correctness differing:         {len(diff['correct_strict'])}/{n}")
    print(f"flexible correctness differing:       {len(diff['correct_flexible'])}/{n}")
    for i in (diff["strict"] or diff["flexible"])[:3]:
        prompt, completion, strict = harness_parts(samples[i]["strict-match"])
        print(
            f"  doc {i}: lm-eval strict {strict!r} flexible {harness_parts(samples[i]['flexible-extract'])[2]!r} "
            f"| looper strict {looper_rows[i]['answer']!r} flexible {fmt.flexible_extract(looper_rows[i]['completion'])!r}"
            f" | same prompt: {prompt == looper_prompts[i]}"
        )
        print(f"     lm-eval: {completion[:160]!r}")
        print(f"     looper:  {looper_rows[i]['completion'][:160]!r}")
    return {"ids_ok": ids_ok, "accuracy": acc, "diff": diff}


def explain_flips(model_dir: str, pairs: list[tuple[int, str, str, str]]) -> None:
    """For each (doc, prompt, harness completion, looper completion) that differ: the top-2 logit
    gap of the float32 model, alone, at the first token where the two tokenized completions part."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for doc, prompt, theirs, ours in pairs:
        a, b = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (theirs, ours))
        common = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        context = tokenizer(prompt, add_special_tokens=False)["input_ids"] + a[:common]
        with torch.inference_mode():
            logits = model(torch.tensor([context])).logits[0, -1].float()
        top = logits.topk(2)
        gap = float(top.values[0] - top.values[1])
        nxt = [tokenizer.decode(ids[common : common + 1]) if len(ids) > common else "<end>" for ids in (a, b)]
        print(
            f"  flip doc {doc}: first differing token #{common}: lm-eval {nxt[0]!r} vs looper {nxt[1]!r}; "
            f"top-2 logit gap {gap:.2e} ({'near-tie' if gap < 1e-4 else 'NOT a near-tie'}); "
            f"top-2 here {tokenizer.convert_ids_to_tokens(top.indices.tolist())}"
        )


def looper_answers(result: dict) -> list[dict]:
    artifact = Path(result["path"])
    rows = read_rows(artifact / "completions.parquet")
    return [r for r in rows if r["model"] == "base" and r["sample"] == 0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=lm_eval_format.MAX_GEN_TOKS)
    parser.add_argument("--scheduler", choices=("continuous", "static"), default="continuous")
    parser.add_argument("--also-static", action="store_true", help="also time looper --scheduler static")
    parser.add_argument(
        "--bf16-check", action="store_true", help="also time looper --dtype bfloat16; count changed answers"
    )
    parser.add_argument(
        "--first-n-check",
        action="store_true",
        help="also run the harness with fewshot_config sampler first_n (diagnostic, timed too)",
    )
    args = parser.parse_args()
    if not (LMEVAL_BIN / "lm_eval").is_file():
        raise SystemExit(
            f"no lm_eval next to {sys.executable} nor in {LMEVAL_VENV}/bin: pip install lm-eval (docstring)"
        )
    if not GSM8K.is_dir():
        raise SystemExit(f"no local GSM8K copy at {GSM8K}")
    from looper.eval.questions import fewshot_examples
    from looper.policy.models import resolve_model
    from looper.store.artifacts import Store

    out = ROOT / "bench" / "out" / "eval_lmeval" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    tasks = write_tasks()
    print(f"wrote {', '.join(str(p.relative_to(ROOT)) for p in tasks.values())}")
    model_dir = str(resolve_model(SMOLLM).path)  # the GGUF converted once, outside the timings
    workdir = out / "looper"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "looper",
            "prepare",
            "--source",
            str(GSM8K),
            "--workdir",
            str(workdir),
            "--json",
        ],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        env=os.environ | OFFLINE | {"PYTHONPATH": str(ROOT)},
    )
    shape = (args.limit, args.batch_size, args.max_new_tokens)

    lm_s, lm_results, lm_samples = run_lmeval(TASK, model_dir, out / "lm-eval", *shape)
    print(f"lm-eval: {lm_s:.1f} s", flush=True)
    looper_s, looper_json = run_looper(workdir, *shape, "--scheduler", args.scheduler)
    print(f"looper:  {looper_s:.1f} s", flush=True)
    looper_rows = looper_answers(looper_json)  # read now: a later variant's run replaces "latest"
    static = bf16 = first_n = None
    if args.also_static:
        static = run_looper(workdir, *shape, "--scheduler", "static")
        print(f"looper --scheduler static: {static[0]:.1f} s", flush=True)
    if args.bf16_check:
        bf16 = run_looper(workdir, *shape, "--scheduler", args.scheduler, "--dtype", "bfloat16")
        print(f"looper --dtype bfloat16: {bf16[0]:.1f} s", flush=True)
    if args.first_n_check:
        first_n = run_lmeval(TASK_FIRST_N, model_dir, out / "lm-eval-first-n", *shape)
        print(f"lm-eval (first_n): {first_n[0]:.1f} s", flush=True)

    artifact = Path(looper_json["path"])
    report = json.loads((artifact / "report.json").read_text())
    prepare = Store(workdir).resolve("prepare")
    shots, shots_note = fewshot_examples(prepare, looper_rows)
    looper_prompts = [lm_eval_format.build_prompt(s, r["question"]) for s, r in zip(shots, looper_rows)]
    manifest = json.loads((artifact / "manifest.json").read_text())
    if manifest["models"]["base"]["prompt_example"] != looper_prompts[0]:
        raise SystemExit("rebuilt looper prompt differs from the one in the eval manifest")

    print()
    print(f"machine: {machine()}")
    print(
        f"{args.limit} GSM8K test questions, SmolLM2-135M-Instruct float32, 5-shot (harness default random "
        f"examples; looper's answers: {shots_note}), greedy, batch {args.batch_size}, max {args.max_new_tokens} "
        f"new tokens, looper --scheduler {args.scheduler}"
    )
    agreement = compare(TASK, lm_samples, lm_results, looper_rows, looper_prompts, report)
    flips = agreement["diff"]["completion"]
    explain_flips(
        model_dir,
        [
            (
                i,
                looper_prompts[i],
                harness_parts(lm_samples[i]["strict-match"])[1],
                looper_rows[i]["completion"],
            )
            for i in flips
        ],
    )
    if first_n:
        compare(TASK_FIRST_N, first_n[2], first_n[1], looper_rows, looper_prompts, report)
    print(
        f"wall-clock lm-eval {TASK}: {lm_s:.1f} s, looper eval: {looper_s:.1f} s, "
        f"ratio lm-eval / looper {lm_s / looper_s:.2f}x (goal >= 2x)"
    )
    if static:
        rows = looper_answers(static[1])
        differ = [i for i, (a, b) in enumerate(zip(looper_rows, rows)) if a["completion"] != b["completion"]]
        print(
            f"wall-clock looper --scheduler static: {static[0]:.1f} s, ratio lm-eval / looper-static "
            f"{lm_s / static[0]:.2f}x, static / {args.scheduler} {static[0] / looper_s:.2f}x; "
            f"completions differing static vs {args.scheduler}: {len(differ)}/{len(rows)} {differ[:20]}"
        )
    if bf16:
        theirs = looper_answers(bf16[1])
        changed = [i for i, (a, b) in enumerate(zip(looper_rows, theirs)) if a["answer"] != b["answer"]]
        right = sum(r["correct"] for r in looper_rows), sum(r["correct"] for r in theirs)
        print(
            f"wall-clock looper --dtype bfloat16: {bf16[0]:.1f} s, float32 / bfloat16 {looper_s / bf16[0]:.2f}x; "
            f"answers changed vs float32: {len(changed)}/{len(theirs)} {changed[:20]}; "
            f"correct float32 {right[0]}, bfloat16 {right[1]}"
        )
    if first_n:
        print(
            f"wall-clock lm-eval {TASK_FIRST_N}: {first_n[0]:.1f} s, ratio lm-eval / looper {first_n[0] / looper_s:.2f}x"
        )
    print(f"outputs: {out}")


if __name__ == "__main__":
    main()
