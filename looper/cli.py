"""The `looper` command line: thin typer commands that build a config and call a stage.

Each command's options come from the stage's config dataclass (`looper.config`), so the
help text and defaults live in one place. Errors become one line on stderr and exit 1;
`--debug` shows the traceback and the libraries' own logging.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import inspect
import os
import sys
import traceback
import typing
from collections.abc import Callable
from typing import Annotated, Any

import orjson
import typer

from looper.config import (
    STAGE_CONFIGS,
    PrepareConfig,
    RunOptions,
    build_config,
    cli_option,
    read_pipeline_file,
)
from looper.errors import LooperError
from looper.plan.checks import PlanConfig

app = typer.Typer(
    name="looper",
    help="Post-train a reasoning LLM on grade-school math: prepare -> sft -> rollouts -> ppo -> eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class State:
    config_file: str | None = None
    debug: bool = False


def quiet_libraries() -> None:
    """Keep transformers/datasets/torch notices out of the default output (--debug keeps them)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in (
        "transformers",
        "datasets",
        "trl",
        "peft",
        "accelerate",
        "torch",
        "httpx",
        "bitsandbytes",
        "math_verify",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Progress bars off through the environment, read when the libraries load: importing transformers
    # and datasets here would cost every command (`looper plan` included) seconds. The weight-loading
    # and per-map ("Tokenizing...") bars go; the training bar stays.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already loaded (in-process callers): too late for the environment
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


@app.callback()
def main_options(
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            "-c",
            envvar="LOOPER_CONFIG",
            help="Pipeline file (pipelines/<name>.toml) supplying defaults per stage; CLI options override it.",
        ),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and library logging.")] = False,
) -> None:
    State.config_file = config
    State.debug = debug


def run_stage(stage: str, stage_run: Callable[[Any], Any], cli_values: dict[str, Any]) -> None:
    """Merge defaults < pipeline file < CLI, run the stage, print the result."""
    from looper.config import stage_fields

    cls = STAGE_CONFIGS[stage]
    values = {k: v for k, v in cli_values.items() if k in stage_fields(cls)}
    file_values = read_pipeline_file(State.config_file)[stage] if State.config_file else {}
    if stage == "loop" and values.get("pipeline") is None:
        values["pipeline"] = State.config_file  # the loop configures each round's stages from the same file
    config = build_config(cls, file_values=file_values, cli_values=values)
    print_result(stage, stage_run(config), config.json)


def print_result(stage: str, result: Any, as_json: bool) -> None:
    status = "up to date, skipped" if result.skipped else "done"
    typer.echo(f"{stage} {result.version}: {status} -> {result.path}")
    for key, value in {**result.counts, **result.metrics}.items():
        typer.echo(f"  {key}: {value}")
    if as_json:
        typer.echo(orjson.dumps(result.as_json()).decode())


# the module whose run() a command calls; `eval` would shadow the builtin as a module name, and the
# loop sits above the stages in its own wing
STAGE_MODULES = {"eval": "looper.stages.evaluate", "loop": "looper.loop.run"}


def home(workdir: str | None) -> str:
    """--workdir, else $LOOPER_HOME, else the current directory: where the commands without a
    stage config (merge, rescore, status, show, export, gc, verify) find the artifacts."""
    return workdir or os.environ.get("LOOPER_HOME") or "."


def stage_command(name: str, summary: str, group: typer.Typer | None = None) -> None:
    """Register `looper <name>`: one option per field of the stage's config dataclass.

    The signature is built from the dataclass so that an option, its type, its help text
    and its default exist in exactly one place (`looper.config`). With `group`, the command
    becomes that group's default action, so the group can also hold subcommands
    (`looper rollouts` runs the stage, `looper rollouts merge` is a subcommand).
    """
    cls = STAGE_CONFIGS[name]
    hints = typing.get_type_hints(cls)
    params = []
    run_options = {f.name for f in dataclasses.fields(RunOptions)}
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name in run_options):  # stage options first
        if not f.metadata.get("cli", True):  # set from a pipeline-file table only
            continue
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name] is bool:
            flags = (f"{flag}/--no-{flag[2:]}",) if f.default else (flag,)
        else:
            flags = (flag,)
        annotation = Annotated[hints[f.name] | None, cli_option(cls, f.name, *flags)]
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
        )

    def command(ctx: typer.Context, **values: Any) -> None:
        if ctx.invoked_subcommand is not None:
            return
        stage = importlib.import_module(STAGE_MODULES.get(name, f"looper.stages.{name}"))
        run_stage(name, stage.run, values)

    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    command.__signature__ = inspect.Signature([context, *params])  # typer reads the options from here
    command.__doc__ = summary
    if group is None:
        app.command(name=name)(command)
    else:
        group.callback(invoke_without_command=True)(command)
        app.add_typer(group, name=name)


stage_command("prepare", "Load GSM8K (hub, local JSONL or synthetic), split train/dev/test, write Parquet.")
stage_command(
    "sft", "Supervised LoRA/QLoRA fine-tuning (TRL SFTTrainer) of the base model on the train split."
)
stage_command(
    "ppo",
    "Offline policy optimisation (GRPO-style, TRL) on the scored rollouts; --online samples fresh groups.",
)
stage_command(
    "dpo",
    "Direct Preference Optimisation (TRL DPOTrainer) on best-correct vs worst-wrong arm pairs of the rollouts.",
)
stage_command(
    "loop",
    "Rounds of rollouts from the newest policy -> ppo (or dpo) -> dev eval, with early stop and a report.",
)
stage_command(
    "eval",
    "Evaluate and compare models (base, sft, ppo, ...) with intervals, paired tests, a report and plots.",
)
rollouts_app = typer.Typer(help="Multi-arm rollouts scored by Regime W.", add_completion=False)
stage_command(
    "rollouts",
    "Sample every arm (style x temperature) on each train question; score with Regime W.",
    group=rollouts_app,
)


@rollouts_app.command("merge")
def rollouts_merge(
    parts: Annotated[
        list[str], typer.Argument(help="Rollouts artifacts made with --shard i/n: version ids or paths.")
    ],
    workdir: Annotated[str | None, cli_option(RunOptions, "workdir")] = None,
    force: Annotated[bool | None, cli_option(RunOptions, "force", "--force")] = None,
    json: Annotated[bool | None, cli_option(RunOptions, "json", "--json")] = None,
) -> None:
    """Combine the shard artifacts of one rollouts run (--shard 1/n ... n/n) into one version."""
    from looper.stages.rollouts_merge import merge

    result = merge(parts, workdir=home(workdir), force=bool(force))
    print_result("rollouts", result, bool(json))


@rollouts_app.command("rescore")
def rollouts_rescore(
    version: Annotated[
        str | None,
        typer.Argument(help="Rollouts artifact to rescore: version id or path (default: the latest)."),
    ] = None,
    weights: Annotated[str | None, cli_option(STAGE_CONFIGS["rollouts"], "weights")] = None,
    workdir: Annotated[str | None, cli_option(RunOptions, "workdir")] = None,
    force: Annotated[bool | None, cli_option(RunOptions, "force", "--force")] = None,
    json: Annotated[bool | None, cli_option(RunOptions, "json", "--json")] = None,
) -> None:
    """A new rollouts version with other reward weights (the rewards table of --config, then --weights), no generation."""
    from looper.stages.rescore import run as rescore

    table = read_pipeline_file(State.config_file)["rollouts"].get("rewards") if State.config_file else None
    workdir = home(workdir)
    result = rescore(version, workdir=workdir, weights=weights, table=table, force=bool(force))
    print_result("rollouts", result, bool(json))


regime_w_app = typer.Typer(help="Regime W coherence scoring tools.", add_completion=False)
app.add_typer(regime_w_app, name="regime-w")


@regime_w_app.command("demo")
def regime_w_demo() -> None:
    """Score a few hand-written arm sets and print every score: a sanity check with no model."""
    from looper.regime_w.demo import main as demo

    demo()


@app.command()
def plan(
    gpu_gb: Annotated[float | None, cli_option(PlanConfig, "gpu_gb")] = None,
    model_config: Annotated[str | None, cli_option(PlanConfig, "model_config")] = None,
    workdir: Annotated[str | None, cli_option(PlanConfig, "workdir")] = None,
    json: Annotated[bool | None, cli_option(PlanConfig, "json", "--json")] = None,
) -> None:
    """Check the pipeline file (--config), the environment and each stage's GPU memory, in seconds."""
    from looper.plan import checks

    values = {"gpu_gb": gpu_gb, "model_config": model_config, "workdir": workdir, "json": json}
    config = build_config(PlanConfig, file_values={"pipeline": State.config_file}, cli_values=values)
    raise typer.Exit(checks.run(config))


@app.command()
def status(
    workdir: Annotated[str | None, cli_option(PrepareConfig, "workdir")] = None,
    json: Annotated[bool | None, cli_option(PrepareConfig, "json", "--json")] = None,
) -> None:
    """Show every artifact: version, inputs, created time, and whether it is stale; flag corrupt,
    unreadable, interrupted (.partial) and dangling-LATEST states."""
    from looper.store.status import collect, format_row

    workdir = home(workdir)
    rows = collect(workdir)
    for row in rows:
        typer.echo(format_row(row))
    if not rows:
        typer.echo(f"no artifacts under {os.path.abspath(workdir)}")
    if json:
        typer.echo(
            orjson.dumps({"stage": "status", "path": os.path.abspath(workdir), "artifacts": rows}).decode()
        )


@app.command()
def show(
    stage: Annotated[str, typer.Argument(help="prepare, rollouts, eval, sft, ppo, dpo or loop.")],
    version: Annotated[
        str | None, typer.Argument(help="Version id or artifact path. [default: latest]")
    ] = None,
    format: Annotated[
        str | None,
        typer.Option(
            "--format", help="jsonl, csv or table. [default: table on a terminal, jsonl when piped]"
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Show at most this many rows (table: 20).")] = None,
    columns: Annotated[str | None, typer.Option(help="Comma-separated columns to keep.")] = None,
    question: Annotated[
        str | None,
        typer.Option(help="Only this question id; rollouts as a table: its arms side by side with scores."),
    ] = None,
    workdir: Annotated[str | None, cli_option(RunOptions, "workdir")] = None,
) -> None:
    """Print an artifact's rows (Parquet tables, training logs) as JSONL, CSV or a table."""
    from looper.store.show import show as do_show

    do_show(
        stage,
        version,
        workdir=home(workdir),
        fmt=format,
        limit=limit,
        columns=columns,
        question=question,
    )


@app.command()
def export(
    model: Annotated[
        str, typer.Option(help="Adapter to merge: sft, ppo, dpo (latest), or an adapter directory.")
    ],
    out: Annotated[str, typer.Option(help="New directory for the standalone model (must not exist).")],
    base_model: Annotated[
        str | None,
        typer.Option(
            help="Base model, when the adapter has no looper manifest. [default: from the manifest]"
        ),
    ] = None,
    workdir: Annotated[str | None, cli_option(RunOptions, "workdir")] = None,
) -> None:
    """Merge an adapter into its base and write a standalone Hugging Face model (safetensors)."""
    from looper.policy.export import export as do_export

    target = do_export(name=model, out=out, workdir=home(workdir), base_model=base_model)
    typer.echo(f"exported {model} -> {target}")


@app.command()
def gc(
    keep: Annotated[
        int,
        typer.Option(
            help="Versions to keep per stage (newest first; latest and inputs of kept ones always stay)."
        ),
    ] = 2,
    partials: Annotated[
        bool,
        typer.Option("--partials", help="Also remove interrupted runs (.partial dirs: their resume state)."),
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be removed.")] = False,
    broken: Annotated[
        bool,
        typer.Option(
            "--broken",
            help="Instead: remove versions whose manifest is missing or unreadable or whose files do not "
            "match it, leftovers of killed publishes, and LATEST pointers naming no version.",
        ),
    ] = False,
    workdir: Annotated[str | None, cli_option(RunOptions, "workdir")] = None,
) -> None:
    """Remove older artifact versions that no kept artifact depends on, saying what it frees."""
    from looper.store.maintenance import gc as do_gc
    from looper.store.maintenance import gc_broken

    workdir = home(workdir)
    if broken:
        removed, freed = gc_broken(workdir=workdir, dry_run=dry_run)
    else:
        removed, freed = do_gc(workdir=workdir, keep=keep, partials=partials, dry_run=dry_run)
    for path in removed:
        typer.echo(f"{'would remove' if dry_run else 'removed'} {path}")
    typer.echo(
        f"{'would free' if dry_run else 'freed'} {freed / 2**20:.1f} MiB in {len(removed)} director(y/ies)"
    )


@app.command()
def verify(
    stage: Annotated[str | None, typer.Argument(help="Only this stage's artifacts.")] = None,
    version: Annotated[str | None, typer.Argument(help="Only this version (or 'latest').")] = None,
    workdir: Annotated[str | None, cli_option(RunOptions, "workdir")] = None,
    json: Annotated[bool | None, cli_option(RunOptions, "json", "--json")] = None,
) -> None:
    """Re-hash finished artifacts against their manifests; list corrupt or missing files (exit 1 if any)."""
    from looper.store.maintenance import verify as do_verify

    workdir = home(workdir)
    rows = do_verify(workdir=workdir, stage=stage, version=version)
    for row in rows:
        state = "CORRUPT" if row["problems"] else "ok"
        typer.echo(f"{state:<8}{row['stage']:<9} {row['version']}  {row['path']}")
        for problem in row["problems"]:
            typer.echo(f"    {problem}")
    bad = [row for row in rows if row["problems"]]
    typer.echo(
        f"verified {len(rows)} artifact(s): {len(bad)} with problems"
        + ("; `looper gc --broken` removes them, `looper <stage> --force` rebuilds one" if bad else "")
    )
    if json:
        typer.echo(
            orjson.dumps({"stage": "verify", "path": os.path.abspath(workdir), "artifacts": rows}).decode()
        )
    if bad:
        raise typer.Exit(1)


def main() -> None:
    """Console entry point: run the app, turning errors into one line + exit 1."""
    if "--debug" not in sys.argv:
        quiet_libraries()
    try:
        exit_code = app(standalone_mode=False)
    except LooperError as exc:
        typer.echo(f"error: {exc}", err=True)
        if State.debug:
            traceback.print_exc()
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - the user gets one line, --debug the traceback
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # typer's usage errors: bad option, ...
            exc.show()
            sys.exit(exc.exit_code)
        if State.debug:
            traceback.print_exc()
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:  # a write no `disk.space_for` wrapped
            typer.echo(
                f"error: no space left on {exc.filename or 'the device'}: free some space and rerun", err=True
            )
            sys.exit(1)
        typer.echo(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)
    if exit_code == 130:  # typer turns Ctrl-C (KeyboardInterrupt) into 130 without raising
        typer.echo("interrupted: the partial run is kept; the same command resumes it", err=True)
    sys.exit(exit_code or 0)
