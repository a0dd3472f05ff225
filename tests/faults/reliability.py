"""Write RELIABILITY.md from the counts the fault-injection suite left in faults-summary.json.

make test-faults                              # runs tests/faults/, then this script
python tests/faults/reliability.py [SUMMARY] [OUT]   # defaults: faults-summary.json RELIABILITY.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = [
    ("kills injected (SIGKILL at a scheduled point)", "kills_injected"),
    ("kills survived (rerun finished, same version, same rows/weights, same hash)", "kills_survived"),
    ("kill points not reached (the schedule missed)", "kill_points_not_reached"),
    ("rows lost (goal 0)", "rows_lost"),
    ("rows doubled (goal 0)", "rows_doubled"),
    ("adapters differing from the uninterrupted run (goal 0)", "adapters_differ"),
    ("stuck resumes: a rerun that failed (goal 0)", "stuck_resumes"),
    (
        "kill points tried (SIGKILL just before the N-th filesystem mutation under the home)",
        "killpoints_tried",
    ),
    (
        "kill points identical to the uninterrupted run (versions, hashes, counts, files)",
        "killpoints_identical",
    ),
    ("kill points diverging (another version, hash or count; goal 0)", "killpoints_diverged"),
    ("kill points leaving stray files (or gc --broken finding something; goal 0)", "killpoints_stray_files"),
    ("kill points stuck: a rerun that failed (goal 0)", "killpoints_stuck"),
    ("kill points not reached", "killpoints_not_reached"),
    ("concurrent-run races", "races"),
    ("races ending with one complete artifact and nothing stray", "races_clean"),
    ("corrupted files tried", "corruptions_tried"),
    ("corruptions named and recovered from", "corruptions_handled"),
    ("bad inputs tried (incl. a read-only and a full home)", "bad_inputs_tried"),
    ("bad inputs: one-line error, nothing left behind", "bad_inputs_one_line_clean"),
]

# The first row of each group of tests: absent from the counts, the group did not run.
GROUP_STARTS = {"kills_injected", "killpoints_tried", "races", "corruptions_tried", "bad_inputs_tried"}

HEADER = """# Reliability

What the fault-injection suite (`tests/faults/`, issue 12) measured: every stage (prepare, sft,
rollouts, ppo, dpo, eval) on the random tiny model, SIGKILLed at points drawn by a seeded
schedule (`LOOPER_FAULT=<point>:<n>`, looper/store/faults.py: mid-step, mid-save, mid-shard,
mid-commit) and rerun, then compared with the uninterrupted run (rows for data stages,
bit-identical adapter weights for training stages, and the content hash); two and three
concurrent runs; a read-only and a full home (tmpfs); corrupted manifest, shard and checkpoint
files; bad options, files and adapters. Kill points (`tests/faults/test_killpoints.py`, issue 22):
sft, rollouts, ppo, dpo, eval and a 2-round loop SIGKILLed just before their N-th filesystem
mutation under the home (`LOOPER_KILL_AT=N`, an audit hook), for every N with
`LOOPER_KILL_POINTS=all` (what `make test-faults` sets) or 6 evenly spaced N per stage, rerun,
and compared with an uninterrupted run's home: same versions, content hashes and counts, same
files, nothing for `gc --broken` to do.

Regenerate: `make test-faults` (runs the suite, then `python tests/faults/reliability.py`, which
rewrites this file from `faults-summary.json`). Another schedule: `LOOPER_FAULT_SEED=N make test-faults`.
"""


def render(summary: dict) -> str:
    counts = summary["counts"]
    lines = [
        HEADER,
        f"Run {summary['date']} on {summary['machine']}; schedule seed {summary['seed']}; "
        f"{summary['tests_collected']} tests, {summary['tests_failed']} failed; kill points: "
        f"{summary.get('kill_points', 'sample')}.",
        "",
        "| what | count |",
        "|---|---|",
    ]
    group_ran = False
    for label, key in ROWS:
        if key in GROUP_STARTS:  # the first row of a group: whether this session ran that group at all
            group_ran = key in counts
        lines.append(f"| {label} | {counts.get(key, 0) if group_ran else 'not run this time'} |")
    if per_stage := summary.get("kill_points_per_stage"):
        lines += [
            "",
            "Filesystem mutations (kill points) per stage run: "
            + ", ".join(f"{stage} {n}" for stage, n in per_stage.items())
            + ".",
        ]
    if summary.get("failed"):
        lines += ["", "Failed:", "", *[f"- `{name}`" for name in summary["failed"]]]
    if summary.get("notes"):
        lines += ["", *[f"- {note}" for note in summary["notes"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    source = Path(argv[0] if argv else "faults-summary.json")
    target = Path(argv[1] if len(argv) > 1 else "RELIABILITY.md")
    target.write_text(render(json.loads(source.read_text())))
    print(f"wrote {target} from {source}")


if __name__ == "__main__":
    main(sys.argv[1:])
