"""`looper loop`: rounds of rollouts from the newest policy -> ppo (or dpo) -> eval on dev.

    looper --config pipelines/rl-cpu.toml loop --rounds 3         # prepare and sft first if missing
    looper --config pipelines/rl-cpu.toml loop --algorithm dpo
    make loop PIPELINE=pipelines/rl-cpu.toml ROUNDS=3

Round k rolls out the policy round k-1 trained (round 1: the latest sft), trains on those
rollouts, and evaluates the new adapter against sft on the dev split. Each step is an
ordinary stage run, `looper.stages.<stage>.run(config)`, with the config its table of the
pipeline file gives plus what the loop sets (the rollouts' policy and question offset, the
training stage's rollouts version, the eval's dev split and models). So every round leaves
the usual versioned artifacts (data/rollouts/<v>/, checkpoints/ppo/<v>/, data/eval/<v>/) and
round k's rollouts manifest names round k-1's adapter as its input: the lineage is in the
manifests. This module is the one place above the stages (like the CLI): stages never
import each other, the loop only calls their `run`.

Resume. The loop's own record (`rounds.json` in `checkpoints/loop/<version>.partial/`,
rewritten atomically after every step; `looper.loop.rounds`) lists the finished rounds with their
versions and figures; a rerun of the same command skips those rounds entirely and calls the
steps of the unfinished one again, where each stage skips what it finished and resumes what
it had begun (ppo from its last trainer checkpoint, rollouts from its last shard, eval from
its cache). `--force` starts the loop's record afresh; the stages still reuse their finished
versions (to redo one, run that stage with --force). A rerun with more --rounds is a new loop
version whose first rounds are found finished by every stage, so only the new rounds cost
anything.

Early stop: when dev accuracy has not beaten the best so far (sft's dev accuracy counts as
round 0) for `--patience` rounds. Then, optionally, one eval of sft against the final policy
as the [eval] table says (its split: test by default). The loop's artifact,
`checkpoints/loop/<version>/`, holds the final policy's adapter (usable as `--compare loop`,
`--policy loop`), `rounds.json`, `report.md` and `loop.png` (`looper.loop.report`).

How a round runs is a list of steps (`ROUND_STEPS`): a function per step taking the round's
record and filling it in. Other ways of running rounds are other step lists.
"""

from __future__ import annotations

import importlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from looper.config import STAGE_CONFIGS, LoopConfig, build_config, identity, read_pipeline_file
from looper.errors import LooperError
from looper.loop.report import final_figures, fmt, round_figures, write_report
from looper.loop.rounds import final_round, patience_exhausted, read_record
from looper.stages import StageResult
from looper.store.artifacts import Artifact, Store, atomic_write_bytes, dumps_json, read_rows

STAGE = "loop"
STAGE_MODULES = {"eval": "evaluate"}
RECORD = "rounds.json"
# Files of a training artifact that are not the adapter (the loop artifact copies the rest).
NOT_ADAPTER = {"manifest.json", "metrics.jsonl", "trainer", "kl_coef.json"}


def say(text: str) -> None:
    print(f"loop: {text}", flush=True)


class Loop:
    """What every step needs: the store, the pipeline file's stage tables, sft, the record."""

    def __init__(self, config: LoopConfig, tables: dict[str, dict[str, Any]], store: Store):
        self.config, self.tables, self.store = config, tables, store
        self.prepare: Artifact | None = None
        self.sft: Artifact | None = None
        self.record_path: Path | None = None
        self.record: dict[str, Any] = {"rounds": [], "current": None}
        self.version: str | None = None

    def stage_config(self, stage: str, unset: tuple[str, ...] = (), **overrides: Any) -> Any:
        """The stage's config: its table of the pipeline file (less the `unset` keys, back to their
        defaults), then the loop's overrides."""
        values = {"workdir": str(self.store.workdir), "json": False, "force": False, "wait": self.store.wait}
        values = {**values, **overrides}
        table = {k: v for k, v in self.tables.get(stage, {}).items() if k not in unset}
        return build_config(STAGE_CONFIGS[stage], file_values=table, cli_values=values)

    def run_stage(self, stage: str, label: str, unset: tuple[str, ...] = (), **overrides: Any) -> StageResult:
        module = importlib.import_module(f"looper.stages.{STAGE_MODULES.get(stage, stage)}")
        started = time.perf_counter()
        result = module.run(self.stage_config(stage, unset, **overrides))
        state = "up to date, skipped" if result.skipped else f"done in {time.perf_counter() - started:.0f} s"
        say(f"{label} {stage} {result.version}: {state}")
        return result

    def save(self) -> None:
        atomic_write_bytes(self.record_path, dumps_json(self.record))


# --------------------------------------------------------------------------- one round


def rollouts_step(loop: Loop, rnd: dict) -> None:
    """Sample the arms from the round's starting policy (an adapter path: exact lineage)."""
    table = loop.tables.get("rollouts", {})
    offset = table.get("offset", 0)
    limit = loop.stage_config("rollouts").limit
    if loop.config.fresh_questions and limit:
        n_train = loop.prepare.manifest.get("counts", {}).get("train") or len(
            read_rows(loop.prepare.path / "train.parquet")
        )
        offset = (offset + (rnd["round"] - 1) * limit) % max(n_train, 1)
    # a learned arm allocation (thompson, ucb) learns from the previous round's rollouts
    before = [r["rollouts"]["version"] for r in loop.record["rounds"] if r["round"] == rnd["round"] - 1]
    prior = {"arm_prior": before[0]} if before and table.get("arm_allocation", "uniform") != "uniform" else {}
    result = loop.run_stage(
        "rollouts", f"round {rnd['round']}", policy=rnd["policy_in"], offset=offset, **prior
    )
    rnd["rollouts"] = {"version": result.version, "path": result.path, "offset": offset}


def train_step(loop: Loop, rnd: dict) -> None:
    """ppo or dpo on the round's rollouts; continues their adapter (the reference is that adapter)."""
    stage = loop.config.algorithm
    result = loop.run_stage(stage, f"round {rnd['round']}", rollouts=rnd["rollouts"]["version"])
    rnd["train"] = {"stage": stage, "version": result.version, "path": result.path}


def eval_step(loop: Loop, rnd: dict) -> None:
    """sft against the new policy on the dev split (sft's completions come from eval's cache after round 1)."""
    policy = rnd["train"]["path"]
    result = loop.run_stage(
        "eval",
        f"round {rnd['round']}",
        split="dev",
        limit=loop.config.dev_limit,
        compare=f"{loop.sft.path},{policy}",
    )
    rnd["eval"] = {"version": result.version, "path": result.path}


ROUND_STEPS: tuple[tuple[str, Callable[[Loop, dict], None]], ...] = (
    ("rollouts", rollouts_step),
    ("train", train_step),
    ("eval", eval_step),
)


# --------------------------------------------------------------------------- the loop


def ensure_inputs(loop: Loop) -> None:
    """prepare and sft: the latest ones, or made now from their tables when the home has none."""
    for stage in ("prepare", "sft"):
        if loop.store.latest(stage) is None:
            say(f"no {stage} artifact under {loop.store.workdir}: running {stage} first")
            loop.run_stage(stage, "setup")
    loop.prepare, loop.sft = loop.store.resolve("prepare"), gold_sft(loop.store)
    if loop.sft.manifest.get("inputs", {}).get("prepare", {}).get("version") != loop.prepare.version:
        say(
            f"note: sft {loop.sft.version} was trained on another prepare version than the latest "
            f"({loop.prepare.version})"
        )


def gold_sft(store: Store) -> Artifact:
    """The sft the loop starts from: the latest one trained on gold solutions from the base. A
    resumed hybrid or expert loop has published sft versions of its own since (`sft --rollouts`,
    which move sft's LATEST); starting from one of those would be another loop."""
    latest = store.resolve("sft")
    if set(latest.manifest.get("inputs", {})) == {"prepare"}:
        return latest
    gold = []
    for path in store.stage_root("sft").iterdir():
        found = (
            store.find("sft", path.name) if path.is_dir() and "." not in path.name else None
        )  # no .partial
        if found and set(found.manifest.get("inputs", {})) == {"prepare"}:
            gold.append(found)
    if not gold:
        raise LooperError("no sft trained on gold solutions in this home: run `looper sft` first")
    return max(gold, key=lambda a: a.manifest.get("created", ""))


def loop_version(loop: Loop) -> tuple[str, dict]:
    """The loop's identity: its options, the identity of every stage config a round uses, prepare and sft."""
    stages = ("rollouts", loop.config.algorithm, "eval") + (("sft",) if loop.config.mode != "rl" else ())
    steps = {stage: identity(loop.stage_config(stage)) for stage in stages}
    if loop.config.mode == "expert":  # its SFT rounds train by epochs, not the table's max_steps
        steps["sft"] = identity(loop.stage_config("sft", unset=("max_steps",)))
    for stage in steps.values():
        for key in ("offset", "policy", "rollouts", "arm_prior"):  # set per round
            stage.pop(key, None)
    stage_identity = identity(loop.config) | {"steps": steps}
    return loop.store.version_for(
        STAGE, stage_identity, {"prepare": loop.prepare, "sft": loop.sft}
    ), stage_identity


def run(config: LoopConfig) -> StageResult:
    if not config.pipeline:  # choices and ranges of the options are checked by build_config
        raise LooperError(
            "looper loop needs a pipeline file: `looper --config pipelines/<name>.toml loop` "
            "(its stage tables configure every round)"
        )
    store = Store(config.workdir, wait=config.wait)
    loop = Loop(config, read_pipeline_file(config.pipeline), store)
    ensure_inputs(loop)
    version, stage_identity = loop_version(loop)
    loop.version = version
    from looper.loop.hybrid import round_steps

    steps = round_steps(config, ROUND_STEPS)
    if existing := store.reuse(STAGE, version, config.force):
        return StageResult.up_to_date(existing)

    run_ = store.begin(STAGE, version, resume=not config.force)
    loop.record_path = run_.path / RECORD
    if loop.record_path.is_file():
        loop.record = read_record(loop.record_path)
        if loop.record["rounds"]:
            say(f"resuming: {len(loop.record['rounds'])} round(s) already finished")
    rounds = loop.record["rounds"]
    sft_path = str(loop.sft.path)

    while len(rounds) < config.rounds and not patience_exhausted(rounds, config.patience):
        k = len(rounds) + 1
        policy_in = rounds[-1]["train"]["path"] if rounds else sft_path
        rnd = loop.record["current"] or {}
        if rnd.get("round") != k:
            rnd = {"round": k, "policy_in": policy_in}
        loop.record["current"] = rnd
        started = time.time() - rnd.get("wall_s", 0.0)
        for _name, step in steps:
            step(loop, rnd)
            rnd["wall_s"] = time.time() - started
            loop.save()
        rnd["figures"] = round_figures(rnd, sft_path)
        rounds.append(rnd)
        loop.record["current"] = None
        loop.save()
        f = rnd["figures"]
        say(
            f"round {k}: dev accuracy {100 * f['dev']['accuracy']:.1f}% (sft {100 * f['sft_dev']['accuracy']:.1f}%), "
            f"mean reward {fmt(f['mean_reward'])}, kl {fmt(f['kl_mean'])}"
        )
    stop_reason = (
        "patience"
        if patience_exhausted(rounds, config.patience) and len(rounds) < config.rounds
        else "rounds"
    )
    if stop_reason == "patience":
        say(f"stopping early: dev accuracy has not improved for {config.patience} round(s)")

    final = final_round(rounds, config.final)
    test = None
    if config.test_eval:
        result = loop.run_stage("eval", "final", compare=f"{sft_path},{final['train']['path']}")
        test = final_figures(Path(result.path), sft_path, final["train"]["path"]) | {
            "version": result.version
        }
        loop.record["test"] = test
        loop.save()

    for item in Path(final["train"]["path"]).iterdir():  # the final adapter, as a policy of its own
        if item.name not in NOT_ADAPTER:
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, run_.path / item.name)
    summary = {
        "rounds": rounds,
        "final": {"round": final["round"], **final["train"]},
        "stop": stop_reason,
        "test": test,
        "sft": loop.sft.ref(),
    }
    write_report(run_.path, summary, sft_path)
    train_manifest = Artifact.load(Path(final["train"]["path"])).manifest
    artifact = run_.commit(
        config=orjson.loads(orjson.dumps(vars(config))),
        inputs={"prepare": loop.prepare, "sft": loop.sft},
        identity=stage_identity,
        counts={"rounds": len(rounds), "final_round": final["round"]},
        metrics={
            "dev_accuracy": [r["figures"]["dev"]["accuracy"] for r in rounds],
            "sft_dev_accuracy": rounds[0]["figures"]["sft_dev"]["accuracy"],
        }
        | (
            {
                "test_accuracy": {"sft": test["sft"]["accuracy"], "final": test["final"]["accuracy"]},
                "test_mcnemar_p": test["mcnemar_p"],
            }
            if test
            else {}
        ),
        extra={
            "base_model": train_manifest.get("base_model"),
            "stop": stop_reason,
            "final": summary["final"],
            "rounds": [
                {k: r[k] for k in ("round", "policy_in", "rollouts", "train", "eval", "export") if k in r}
                for r in rounds
            ],
        },
    )
    return StageResult.from_artifact(artifact)
