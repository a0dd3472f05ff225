"""The eval report: statistics from completion rows, then report.json, report.md and PNG plots.

`summarize` is a pure function of the rows `looper eval` writes (one per model, question
and sample; `correct` already scored), so it can be tested with hand-written rows:

* per model: accuracy of the first sample (greedy-equivalent) with a 95% Wilson interval,
  format compliance (an answer was found), mean completion tokens, truncation rate (hit
  --max-new-tokens), over all samples; with k > 1 samples also mean@k (the fraction of samples
  right: sampled accuracy), maj@k (the majority answer is right) and pass@k (any sample is
  right); in lm-eval format also the harness's
  "flexible-extract" accuracy next to "strict-match" (`accuracy`);
* per pair of models (A listed before B): accuracy difference B - A with a paired-bootstrap
  95% interval and McNemar's exact p-value, on first-sample correctness; with k > 1 also the
  mean@k difference with a paired-bootstrap interval and a sign-flip permutation p-value;
* per question: which models got it right.

Plots use matplotlib's Agg canvas directly (no pyplot state, no display needed).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from looper import stats
from looper.answers import answers_agree
from looper.data import lm_eval_format
from looper.store.artifacts import atomic_write_bytes, dumps_json

MAX_DISAGREEMENTS = 50  # rows of the "models disagree" table in report.md


def summarize(
    rows: list[dict],
    models: list[str],
    *,
    fmt: str = "chat",
    samples: int = 1,
    bootstrap: int = 10000,
    seed: int = 0,
) -> dict[str, Any]:
    """The report dict (without settings) from eval rows of `models`, all on the same questions."""
    grouped: dict[str, dict[str, list[dict]]] = {m: defaultdict(list) for m in models}
    order: list[str] = []
    for row in rows:
        if row["model"] == models[0] and row["sample"] == 0:
            order.append(row["id"])
        grouped[row["model"]][row["id"]].append(row)
    gold = {row["id"]: row["gold_answer"] for row in rows}
    first: dict[str, list[bool]] = {}
    sampled: dict[str, list[float]] = {}
    report: dict[str, Any] = {"questions": len(order), "samples": samples, "models": {}, "pairs": {}}
    for model in models:
        per_q = [sorted(grouped[model][q], key=lambda r: r["sample"]) for q in order]
        if any(not s for s in per_q):
            raise ValueError(f"model {model} has no completion for some questions")
        first[model] = [bool(s[0]["correct"]) for s in per_q]
        everything = [r for s in per_q for r in s]
        report["models"][model] = entry = _accuracy(sum(first[model]), len(order))
        entry |= {
            "format_compliance": _mean(r["answer"] is not None for r in everything),
            "mean_tokens": _mean(r["tokens"] for r in everything),
            "truncation_rate": _mean(r["truncated"] for r in everything),
        }
        if fmt == "lm-eval":
            flexible = sum(
                lm_eval_format.exact_match(
                    lm_eval_format.flexible_extract(s[0]["completion"]), s[0]["gold_answer"]
                )
                for s in per_q
            )
            entry["flexible"] = _accuracy(flexible, len(order))
        sampled[model] = [_mean(r["correct"] for r in s) for s in per_q]
        if samples > 1:
            # mean@k: the fraction of sampled completions that are right (the policy's sampled accuracy)
            entry[f"mean@{samples}"] = _mean(sampled[model])
            entry[f"maj@{samples}"] = _mean(_majority_right(s, fmt) for s in per_q)
            entry[f"pass@{samples}"] = _mean(any(r["correct"] for r in s) for s in per_q)
    for i, a in enumerate(models):
        for b in models[i + 1 :]:
            diff = stats.paired_bootstrap_diff(first[a], first[b], n_resamples=bootstrap, seed=seed)
            test = stats.mcnemar_exact(first[a], first[b])
            report["pairs"][f"{a} vs {b}"] = {
                "a": a,
                "b": b,
                "diff": diff["diff"],
                "ci95": [diff["low"], diff["high"]],
                "mcnemar_p": test["p_value"],
                "only_a_right": test["b10"],
                "only_b_right": test["b01"],
            }
            if samples > 1:  # per-question fraction of samples right, paired
                mean_k = stats.paired_mean_test(sampled[a], sampled[b], n_resamples=bootstrap, seed=seed)
                report["pairs"][f"{a} vs {b}"][f"mean@{samples}"] = {
                    "diff": mean_k["diff"],
                    "ci95": [mean_k["low"], mean_k["high"]],
                    "p_value": mean_k["p_value"],
                }
    report["per_question"] = [
        {"id": q, "gold_answer": gold[q], "correct": {m: first[m][i] for m in models}}
        for i, q in enumerate(order)
    ]
    return report


def _accuracy(correct: int, n: int) -> dict[str, Any]:
    low, high = stats.wilson_interval(correct, n)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0, "ci95": [low, high]}


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else 0.0


def _majority_right(samples: list[dict], fmt: str) -> bool:
    gold = samples[0]["gold_answer"]
    if fmt == "lm-eval":  # vote on the harness-normalised strict answers
        answers = [None if r["answer"] is None else lm_eval_format.normalize(r["answer"]) for r in samples]
        vote = stats.majority_vote(answers)
        return vote is not None and lm_eval_format.exact_match(vote, gold)
    return answers_agree(stats.majority_vote([r["answer"] for r in samples]), gold)


def compact(report: dict[str, Any]) -> dict[str, Any]:
    """The few numbers `--json` prints: per-model accuracies and the pairwise p-values."""
    out: dict[str, Any] = {"accuracy": {m: e["accuracy"] for m, e in report["models"].items()}}
    extra = [k for k in next(iter(report["models"].values())) if k.startswith(("mean@", "maj@", "pass@"))]
    if any("flexible" in e for e in report["models"].values()):
        extra.append("flexible")
    for key in extra:
        out[key] = {
            m: (e[key]["accuracy"] if key == "flexible" else e[key]) for m, e in report["models"].items()
        }
    if report["pairs"]:
        out["diff"] = {p: e["diff"] for p, e in report["pairs"].items()}
        out["mcnemar_p"] = {p: e["mcnemar_p"] for p, e in report["pairs"].items()}
    return out


# --------------------------------------------------------------------------- rendering


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(report: dict[str, Any]) -> str:
    s = report.get("settings", {})
    k = report["samples"]
    title = f"# Looper eval {report.get('version', '')}".rstrip()
    lines = [title + (f": {s['dataset']}" if s.get("dataset") else ""), ""]
    if s:
        decoding = (
            "greedy"
            if s.get("temperature", 0) == 0
            else f"temperature {s['temperature']}, top-p {s['top_p']}"
        )
        lines += [
            f"{report['questions']} questions from {s.get('questions_from')}; format `{s.get('format')}`; "
            f"{decoding}; {k} sample(s) per question; at most {s.get('max_new_tokens')} new tokens; "
            f"seed {s.get('seed')}; backend {s.get('backend')}.",
            "",
        ]
    lm_eval = any("flexible" in e for e in report["models"].values())
    head = ["model", "accuracy" + (" (strict)" if lm_eval else ""), "95% CI", "correct"]
    head += ["flexible"] if lm_eval else []
    head += [f"mean@{k}", f"maj@{k}", f"pass@{k}"] if k > 1 else []
    head += ["answer found", "mean tokens", "truncated"]
    lines += ["## Accuracy", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, e in report["models"].items():
        cells = [
            _cell(model),
            _pct(e["accuracy"]),
            f"[{_pct(e['ci95'][0])}, {_pct(e['ci95'][1])}]",
            f"{e['correct']}/{e['n']}",
        ]
        cells += [_pct(e["flexible"]["accuracy"])] if lm_eval else []
        cells += [_pct(e[f"mean@{k}"]), _pct(e[f"maj@{k}"]), _pct(e[f"pass@{k}"])] if k > 1 else []
        cells += [_pct(e["format_compliance"]), f"{e['mean_tokens']:.1f}", _pct(e["truncation_rate"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Accuracy is the first sample's; CI is the 95% Wilson interval.", ""]
    if report["pairs"]:
        lines += [
            "## Pairwise (same questions)",
            "",
            "| A | B | B - A | 95% CI (paired bootstrap) | McNemar p | only A right | only B right |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in report["pairs"].values():
            lines.append(
                f"| {_cell(e['a'])} | {_cell(e['b'])} | {100 * e['diff']:+.1f} pts | "
                f"[{100 * e['ci95'][0]:+.1f}, {100 * e['ci95'][1]:+.1f}] | {e['mcnemar_p']:.3g} | "
                f"{e['only_a_right']} | {e['only_b_right']} |"
            )
        lines.append("")
        if k > 1:
            lines += [
                f"Sampled accuracy (mean@{k}, the fraction of the {k} samples right per question), paired:",
                "",
                "| A | B | B - A | 95% CI (paired bootstrap) | sign-flip p |",
                "|---|---|---|---|---|",
            ]
            for e in report["pairs"].values():
                m = e[f"mean@{k}"]
                lines.append(
                    f"| {_cell(e['a'])} | {_cell(e['b'])} | {100 * m['diff']:+.1f} pts | "
                    f"[{100 * m['ci95'][0]:+.1f}, {100 * m['ci95'][1]:+.1f}] | {m['p_value']:.3g} |"
                )
            lines.append("")
    lines += ["![accuracy per model](accuracy.png)", "", "![completion lengths](lengths.png)", ""]
    models = list(report["models"])
    split = [q for q in report["per_question"] if len(set(q["correct"].values())) > 1]
    if len(models) > 1:
        lines += ["## Questions the models disagree on", ""]
        if not split:
            lines += ["None: every model got the same questions right.", ""]
        else:
            lines += [
                f"{len(split)} questions ({min(len(split), MAX_DISAGREEMENTS)} shown; every question is in "
                "report.json under per_question).",
                "",
                "| id | gold | " + " | ".join(map(_cell, models)) + " |",
                "|" + "---|" * (len(models) + 2),
            ]
            for q in split[:MAX_DISAGREEMENTS]:
                marks = " | ".join("yes" if q["correct"][m] else "no" for m in models)
                lines.append(f"| {_cell(q['id'])} | {_cell(q['gold_answer'])} | {marks} |")
            lines.append("")
    return "\n".join(lines)


def _figure(width: float = 6.0, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def plot_accuracy(report: dict[str, Any], path: Path) -> None:
    """One bar per model with its 95% Wilson interval as error bars."""
    names = list(report["models"])
    acc = [report["models"][m]["accuracy"] for m in names]
    low = [a - report["models"][m]["ci95"][0] for a, m in zip(acc, names)]
    high = [report["models"][m]["ci95"][1] - a for a, m in zip(acc, names)]
    fig, ax = _figure(max(4.0, 1.2 * len(names) + 2))
    ax.bar(range(len(names)), acc, yerr=[low, high], capsize=6, color="#4c72b0")
    for x, (a, up) in enumerate(zip(acc, high)):
        ax.text(x, a + up + 0.01, f"{100 * a:.1f}%", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(names)), [Path(n).name or n for n in names])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (95% Wilson interval)")
    # named after the questions it ran on: "gsm8k test", "synthetic dev", "gsm8k-platinum", ...
    dataset = report.get("settings", {}).get("dataset") or "eval"
    title = f"{dataset} accuracy, {report['questions']} questions"
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Title": title})  # also a PNG text chunk, for readers


def plot_lengths(
    lengths: dict[str, list[int]], path: Path, max_new_tokens: int | None = None, dataset: str | None = None
) -> None:
    """Completion-length histograms per model (all samples), the token limit marked."""
    fig, ax = _figure()
    top = max([max(v) for v in lengths.values() if v] + [max_new_tokens or 1])
    bins = [b * (top + 1) / 30 for b in range(31)]
    for name, values in lengths.items():
        ax.hist(values, bins=bins, histtype="step", linewidth=1.5, label=Path(name).name or name)
    if max_new_tokens:
        ax.axvline(max_new_tokens, color="grey", linestyle="--", linewidth=1, label="--max-new-tokens")
    ax.set_xlabel("completion tokens")
    ax.set_ylabel("completions")
    title = f"Completion lengths, {dataset}" if dataset else "Completion lengths"
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Title": title})


def write(out_dir: Path, report: dict[str, Any], rows: list[dict]) -> None:
    """report.json, report.md, accuracy.png and lengths.png into `out_dir`."""
    out_dir = Path(out_dir)
    atomic_write_bytes(out_dir / "report.json", dumps_json(report))
    atomic_write_bytes(out_dir / "report.md", markdown(report).encode())
    plot_accuracy(report, out_dir / "accuracy.png")
    lengths: dict[str, list[int]] = {m: [] for m in report["models"]}
    for row in rows:
        lengths[row["model"]].append(row["tokens"])
    settings = report.get("settings", {})
    plot_lengths(lengths, out_dir / "lengths.png", settings.get("max_new_tokens"), settings.get("dataset"))
