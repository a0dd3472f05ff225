"""Two Looper stages at once on a shared box: each one's throughput alone and side by side.

    .venv/bin/python bench/bench_concurrent.py [--trees before=/path/to/old/checkout,after=.]
        [--limit 4] [--arms 8] [--max-new-tokens 64] [--dtype float32]

For each tree (a checkout of Looper: `before` without the thread policy, `after` with it), runs
`python -m looper rollouts` on SmolLM2-135M-Instruct (policy base, GSM8K train questions) first
alone, then two of the same command at once, each in its own home, and prints generated tokens/s
of each whole command (start-up, model load, generation, Parquet, manifest) and concurrent/solo.
The children get this process's environment minus OMP_*/GOMP_*/MKL_* thread variables, so each
tree runs with the thread settings it chooses itself, as a user's shell would give it.
Goal (issue 24): each concurrent stage >= 40% of its solo throughput, solo not lower than before.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import GSM8K, SMOLLM, load_line, machine

THREAD_VARS = ("OMP_", "GOMP_", "KMP_", "MKL_")


def child_env(tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(THREAD_VARS)}
    env.pop("LOOPER_HOME", None)
    return env | {"PYTHONPATH": str(tree)}


def prepared_home(tree: Path, home: Path) -> Path:
    source = str(GSM8K) if GSM8K.is_dir() else "synthetic"
    subprocess.run(
        [sys.executable, "-m", "looper", "prepare", "--source", source, "--workdir", str(home)],
        env=child_env(tree),
        check=True,
        capture_output=True,
    )
    return home


def rollouts_command(home: Path, args) -> list[str]:
    return [
        sys.executable, "-m", "looper", "rollouts", "--workdir", str(home), "--model", SMOLLM, "--policy", "base",
        "--limit", str(args.limit), "--arms", str(args.arms), "--max-new-tokens", str(args.max_new_tokens),
        "--shard-size", str(args.limit), "--backend", "hf", "--dtype", args.dtype, "--force",
    ]  # fmt: skip


def generated_tokens(home: Path) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from looper.store.artifacts import Store, read_rows

    artifact = Store(home).resolve("rollouts")
    rows = [r for f in sorted(artifact.path.glob("shard-*.parquet")) for r in read_rows(f)]
    return sum(o["tokens"] for r in rows for o in r["arm_outputs"] + r["cf_outputs"])


def run_together(tree: Path, homes: list[Path], args) -> list[tuple[float, float, str]]:
    """Start one rollouts command per home at once; (tokens/s, seconds, load at its end) of each."""
    import threading

    started = time.perf_counter()
    ends: list[tuple[float, str, int, bytes]] = [None] * len(homes)

    def wait(i: int, proc: subprocess.Popen) -> None:
        out, _ = proc.communicate()
        ends[i] = (time.perf_counter() - started, load_line(), proc.returncode, out)

    procs = [
        subprocess.Popen(
            rollouts_command(h, args), env=child_env(tree), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for h in homes
    ]
    waiters = [threading.Thread(target=wait, args=(i, p)) for i, p in enumerate(procs)]
    for w in waiters:
        w.start()
    for w in waiters:
        w.join()
    for _, _, code, out in ends:
        if code:
            sys.exit(f"{tree}: rollouts failed ({code}):\n{out.decode()[-2000:]}")
    return [(generated_tokens(h) / s, s, load) for h, (s, load, _, _) in zip(homes, ends)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trees", default=f"after={Path(__file__).resolve().parents[1]}")
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--arms", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--dtype", default="float32", help="both trees' --dtype (float32: compare threads alone)"
    )
    args = parser.parse_args()
    print(f"machine: {machine()}; {len(os.sched_getaffinity(0))} cores allowed")
    print(
        f"each stage: looper rollouts --policy base --limit {args.limit} --arms {args.arms} "
        f"--max-new-tokens {args.max_new_tokens} --dtype {args.dtype} ({SMOLLM}), whole command timed"
    )
    scratch = Path(tempfile.mkdtemp())
    for spec in args.trees.split(","):
        name, _, path = spec.partition("=")
        tree = Path(path).resolve()
        homes = [prepared_home(tree, scratch / f"{name}-{i}") for i in range(2)]
        ((solo, solo_s, solo_load),) = run_together(tree, homes[:1], args)
        print(f"{name}: alone        {solo:6.1f} tokens/s ({solo_s:.1f} s)  [{solo_load}]", flush=True)
        pair = run_together(tree, homes, args)
        for i, (rate, seconds, load) in enumerate(pair):
            print(
                f"{name}: concurrent {i + 1}  {rate:6.1f} tokens/s ({seconds:.1f} s), "
                f"{100 * rate / solo:.0f}% of alone  [{load}]",
                flush=True,
            )
        print(f"{name}: combined {100 * sum(r for r, _, _ in pair) / solo:.0f}% of alone", flush=True)


if __name__ == "__main__":
    main()
