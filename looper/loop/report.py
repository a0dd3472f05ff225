"""`looper loop`'s report: per-round figures read from the stages' artifacts, report.md, loop.png.

`round_figures` collects what the report shows for one finished round (dev accuracy against
sft from the round's eval, rollout statistics from its rollouts manifest, KL from the training
log); `final_figures` the final policy against sft in the optional last eval. `write_report`
writes `report.md`, `loop.png` and `summary.json` into the loop's artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from looper.regime_w import bandit
from looper.store.artifacts import Artifact, atomic_write_bytes, dumps_json, write_figure


def round_figures(round_record: dict, sft_name: str) -> dict:
    """The numbers the loop report shows for one round, read from its stages' artifacts; the eval
    names the policies `<stage>:<version>` (looper.loop.rounds.policy_name)."""
    rollouts = Artifact.load(Path(round_record["rollouts"]["path"])).manifest
    m, arms = rollouts.get("metrics", {}), rollouts.get("counts", {}).get("arms")
    report = orjson.loads((Path(round_record["eval"]["path"]) / "report.json").read_bytes())
    name = f"{round_record['train']['stage']}:{round_record['train']['version']}"
    policy, sft = report["models"][name], report["models"][sft_name]
    pair = report["pairs"].get(f"{sft_name} vs {name}", {})
    log = Path(round_record["train"]["path"]) / "metrics.jsonl"
    logs = (
        [orjson.loads(line) for line in log.read_bytes().splitlines() if line.strip()]
        if log.is_file()
        else []
    )
    kls = [row["kl"] for row in logs if "kl" in row]
    train = Artifact.load(Path(round_record["train"]["path"])).manifest
    return {
        "dev": {k: policy[k] for k in ("accuracy", "ci95", "correct", "n")},
        "sft_dev": {k: sft[k] for k in ("accuracy", "ci95", "correct", "n")},
        "vs_sft": {"diff": pair.get("diff"), "mcnemar_p": pair.get("mcnemar_p")},
        "arms": arms,
        "mean_reward": m.get("mean_arm_reward"),
        "mean_question_reward": m.get("mean_reward"),
        "pass_at_n": m.get("pass_at_n"),
        "maj_at_n": m.get("maj_at_n"),
        "auroc_s_wm": m.get("auroc_s_wm"),
        # under the reward the round trained with (ppo counts it); dpo has none: the rollouts' arm reward
        "zero_variance_groups": train.get("counts", {}).get(
            "zero_variance_groups", m.get("zero_variance_groups")
        ),
        "arm_allocation": rollouts.get("allocation"),  # shares and posterior of a bandit allocation
        "questions": rollouts.get("counts", {}).get("questions"),
        "kl_mean": sum(kls) / len(kls) if kls else None,
        "kl_last": kls[-1] if kls else None,
        "steps": train.get("counts", {}).get("steps"),
    }


def final_figures(eval_dir: Path, sft_name: str, final_name: str) -> dict:
    report = orjson.loads((eval_dir / "report.json").read_bytes())
    pair = report["pairs"][f"{sft_name} vs {final_name}"]
    pick = lambda e: {k: e[k] for k in ("accuracy", "ci95", "correct", "n")}  # noqa: E731
    return {
        "split": report["settings"]["questions_from"],
        "sft": pick(report["models"][sft_name]),
        "final": pick(report["models"][final_name]),
        "diff": pair["diff"],
        "ci95": pair["ci95"],
        "mcnemar_p": pair["mcnemar_p"],
        "only_sft_right": pair["only_a_right"],
        "only_final_right": pair["only_b_right"],
    }


def fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.3g}"


def markdown(summary: dict) -> str:
    rounds = summary["rounds"]
    arms = rounds[0]["figures"]["arms"]
    sft = rounds[0]["figures"]["sft_dev"]
    lines = [
        f"# Looper loop: {len(rounds)} round(s), stopped by {summary['stop']}",
        "",
        f"Dev accuracy of sft (round 0): {fmt(sft['accuracy'], True)} [{fmt(sft['ci95'][0], True)}, "
        f"{fmt(sft['ci95'][1], True)}] ({sft['correct']}/{sft['n']}). Final policy: round "
        f"{summary['final']['round']} ({summary['final']['stage']} {summary['final']['version']}).",
        "",
        "## Rounds",
        "",
        f"| round | rollouts | {summary['final']['stage']} | dev accuracy | 95% CI | vs sft (McNemar p) | "
        f"mean arm reward | KL (mean/step) | pass@{arms} | maj@{arms} | AUROC s_wm | zero-var groups |",
        "|" + "---|" * 12,
    ]
    for r in rounds:
        f = r["figures"]
        lines.append(
            f"| {r['round']} | {r['rollouts']['version']} | {r['train']['version']} | {fmt(f['dev']['accuracy'], True)} "
            f"| [{fmt(f['dev']['ci95'][0], True)}, {fmt(f['dev']['ci95'][1], True)}] | "
            f"{fmt(f['vs_sft']['diff'] and 100 * f['vs_sft']['diff'])} pts (p {fmt(f['vs_sft']['mcnemar_p'])}) | "
            f"{fmt(f['mean_reward'])} | {fmt(f['kl_mean'])} | {fmt(f['pass_at_n'], True)} | "
            f"{fmt(f['maj_at_n'], True)} | {fmt(f['auroc_s_wm'])} | {f['zero_variance_groups']}/{f['questions']} |"
        )
    lines += [
        "",
        f"pass@{arms}, maj@{arms}, mean reward, AUROC of s_wm (for the majority answer being right) and "
        "zero-variance groups are those of the round's rollouts, i.e. of the policy the round starts from, on "
        "that round's train questions; zero-variance groups are counted under the reward ppo trained with "
        "(the arm reward for dpo). KL is the mean per-token KL to the round's reference over its steps.",
        "",
        "![per-round figures](loop.png)",
        "",
        *bandit.report_lines(rounds),
    ]
    if summary["test"]:
        t = summary["test"]
        lines += [
            "## Final policy against sft",
            "",
            f"On {t['split']}:",
            "",
            "| model | accuracy | 95% CI | correct |",
            "|---|---|---|---|",
        ]
        for name in ("sft", "final"):
            e = t[name]
            lines.append(
                f"| {name} | {fmt(e['accuracy'], True)} | [{fmt(e['ci95'][0], True)}, "
                f"{fmt(e['ci95'][1], True)}] | {e['correct']}/{e['n']} |"
            )
        lines += [
            "",
            f"Difference {100 * t['diff']:+.1f} pts, paired-bootstrap 95% CI [{100 * t['ci95'][0]:+.1f}, "
            f"{100 * t['ci95'][1]:+.1f}], McNemar exact p = {t['mcnemar_p']:.3g} "
            f"(only sft right: {t['only_sft_right']}, only final right: {t['only_final_right']}); "
            f"eval {t['version']}.",
            "",
        ]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    from looper.eval.report import _figure

    rounds = summary["rounds"]
    xs = [r["round"] for r in rounds]
    f = [r["figures"] for r in rounds]
    fig, _ = _figure(10, 7)
    fig.clear()
    axes = fig.subplots(2, 2)
    ax = axes[0][0]
    sft = f[0]["sft_dev"]
    acc = [x["dev"]["accuracy"] for x in f]
    ax.errorbar(
        [0] + xs,
        [sft["accuracy"]] + acc,
        capsize=4,
        marker="o",
        yerr=[
            [sft["accuracy"] - sft["ci95"][0]] + [a - x["dev"]["ci95"][0] for a, x in zip(acc, f)],
            [sft["ci95"][1] - sft["accuracy"]] + [x["dev"]["ci95"][1] - a for a, x in zip(acc, f)],
        ],
    )
    ax.set_title("dev accuracy (95% Wilson); round 0 = sft")
    for ax, keys, title in (
        (axes[0][1], ("mean_reward",), "mean arm reward of the round's rollouts"),
        (axes[1][0], ("kl_mean",), "mean KL to the reference"),
        (axes[1][1], ("pass_at_n", "maj_at_n", "auroc_s_wm"), "rollouts: pass@n, maj@n, AUROC s_wm"),
    ):
        for key in keys:
            ys = [x[key] for x in f]
            if any(y is not None for y in ys):
                ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=key)
        ax.set_title(title, fontsize=10)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for row in axes:
        for ax in row:
            ax.set_xlabel("round")
            ax.set_xticks([0] + xs if ax is axes[0][0] else xs)
    fig.tight_layout()
    write_figure(path, fig)


def write_report(out_dir: Path, summary: dict, sft_name: str) -> None:
    atomic_write_bytes(out_dir / "report.md", markdown(summary).encode())
    plot(summary, out_dir / "loop.png")
    atomic_write_bytes(out_dir / "summary.json", dumps_json(summary))
