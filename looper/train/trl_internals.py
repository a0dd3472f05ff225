"""Every use of a private TRL or transformers name in Looper, behind one door.

Looper's GRPO needs what TRL 1.16 offers no public hook for: training each completion at the
temperature it was sampled with (one temperature per row, offline arms differ), the KL of each
micro-batch, a file written into every checkpoint, the rewards of a batch and its advantages.
Those are method overrides of `GRPOTrainer`'s private methods, here and only here;
`looper.train.grpo` builds on the public hooks `HookedGRPOTrainer` exposes. Other private reads
(token and loss totals, the trainer's metrics, the optimizer save) are small functions below.

Private names move between releases, so the TRL version is checked when a trainer is built:
outside `SUPPORTED_TRL` Looper stops with one line naming the range (pyproject pins the same).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from trl import GRPOTrainer

from looper.errors import LooperError

# The TRL releases whose private methods this module was written against (>= first, < second).
SUPPORTED_TRL = ("1.16", "1.17")


def check_trl_version(version: str | None = None) -> None:
    """A one-line error when the installed TRL is outside SUPPORTED_TRL."""
    from packaging.version import Version

    if version is None:
        import trl

        version = trl.__version__
    low, high = SUPPORTED_TRL
    if not Version(low) <= Version(version) < Version(high):
        raise LooperError(
            f"TRL {version} is not supported: Looper's GRPO overrides TRL internals tested on "
            f"trl>={low},<{high}; install that range (pip install 'trl>={low},<{high}')"
        )


def pad(tensors: list, padding_value: int, padding_side: str):
    """TRL's own padding helper, so recomputed log-probs see the batch layout TRL trains on."""
    from trl.trainer.utils import pad as trl_pad

    return trl_pad(tensors, padding_value, padding_side=padding_side)


class HookedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with per-row sampling temperatures and public hooks over its private methods.

    Temperatures: `row_temperatures(inputs)` names, for each completion of a generation batch,
    the temperature it was sampled at (default: the trainer's current `temperature`, which an
    online schedule may move). Every log-prob TRL takes (the policy's in the loss, the old and
    the reference policy's for the ratio and the KL, and `token_logprobs` for a recompute) is
    log_softmax(logits / T_row): the policy each completion was drawn from. TRL's fused LM head
    (tiled, never the full logits) divides by the one temperature the trainer was built with, so
    each row's hidden states are scaled into it; a head where that is not exact (a bias, soft-
    capping) is scored from the model's own logits of the completion positions instead.
    """

    def __init__(self, *args, **kwargs):
        check_trl_version()
        self._row_temps: torch.Tensor | None = None
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ hooks for subclasses

    def row_temperatures(self, inputs: list[dict]) -> list[float]:
        return [float(self.temperature)] * len(inputs)

    def on_micro_batch_kl(self, kl: float) -> None:
        """The mean KL of one training micro-batch (all processes), as TRL logs it."""

    def before_checkpoint(self, folder: Path) -> None:
        """Called before transformers writes a checkpoint into `folder` (created already)."""

    def rewrite_advantages(self, output: dict, rewards_per_func: torch.Tensor) -> None:
        """Change `output["advantages"]` of a scored generation batch in place."""

    replay_stored_logprobs = False  # True: the ratio's denominator is the log-probs the rollout_func returned
    # True (with replay_stored_logprobs): the denominator is the reference policy's log-probs instead, taken in
    # the reference pass TRL runs for the KL anyway; valid where the reference is the policy before any update
    # (`reference_is_initial_policy`), so a recompute of the behaviour log-probs costs no forward of its own
    behaviour_from_reference = False

    def on_behaviour_logprobs(
        self, stored: torch.Tensor, behaviour: torch.Tensor, mask: torch.Tensor
    ) -> None:
        """A replayed batch's stored log-probs and the behaviour ones that replace them (padded, with the
        completion mask), when `behaviour_from_reference`."""

    def reference_is_initial_policy(self) -> bool:
        """Whether TRL's reference pass scores with the policy as it is before any update: a PEFT model
        (no separate reference copy) with a nonzero KL coefficient (else TRL runs no reference pass),
        whose reference is the frozen 'ref' copy of a continued adapter, or the base under a fresh LoRA
        that starts as the identity (PEFT's default init: B = 0)."""
        from peft import PeftModel

        model = self.accelerator.unwrap_model(self.model)
        if self.beta == 0.0 or self.ref_model is not None or not isinstance(model, PeftModel):
            return False
        if "ref" in model.peft_config:
            return True
        return all(getattr(c, "init_lora_weights", None) is True for c in model.peft_config.values())

    def token_logprobs(self, input_ids, attention_mask, logits_to_keep: int, temperatures) -> torch.Tensor:
        """Log-probs of the last `logits_to_keep` tokens of each row at its temperature (no grad here
        is the caller's choice), through the same forward the loss uses."""
        self._row_temps = torch.as_tensor(temperatures, dtype=torch.float32)
        try:
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, logits_to_keep
            )
        finally:
            self._row_temps = None
        return logps

    # ------------------------------------------------------------------ TRL's private methods

    def _generate_and_score_completions(self, inputs):
        temps = torch.tensor(self.row_temperatures(inputs), dtype=torch.float32)
        self._row_temps = temps  # the old and reference log-probs TRL takes in here
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._row_temps = None
        output["temperatures"] = temps.to(
            output["advantages"].device
        )  # split into micro-batches with the rest
        if self.replay_stored_logprobs:
            # the stored log-probs come back padded as `sampling_per_token_logps` (rollout_func "logprobs")
            stored = output["sampling_per_token_logps"]
            output["old_per_token_logps"] = stored
            if self.behaviour_from_reference:
                output["old_per_token_logps"] = output["ref_per_token_logps"]
                self.on_behaviour_logprobs(stored, output["ref_per_token_logps"], output["completion_mask"])
        self.rewrite_advantages(output, self._rewards_per_func)
        return output

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._rewards_per_func

    def _compute_loss(self, model, inputs):
        self._row_temps = inputs.get("temperatures")
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._row_temps = None
        if self.model.training and self._metrics["train"].get("kl"):  # TRL's KL, all ranks gathered
            self.on_micro_batch_kl(self._metrics["train"]["kl"][-1])
        return loss

    def _save_checkpoint(self, model, trial):
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            self.before_checkpoint(folder)
        super()._save_checkpoint(model, trial)

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal,
    ):
        if any(v is not None for v in multimodal.values()):
            raise LooperError("Looper's GRPO trains text models only (a multimodal batch reached it)")
        rows = input_ids.size(0)
        temps = (
            self._row_temps if self._row_temps is not None else torch.full((rows,), float(self.temperature))
        )
        if temps.numel() != rows:
            raise RuntimeError(f"{temps.numel()} row temperatures for a batch of {rows} rows")
        batch_size = batch_size or rows
        chunks = [slice(start, start + batch_size) for start in range(0, rows, batch_size)]
        # TRL's fused head where it pays: exact (a linear head) and scoring only the completion
        # positions, which it does on Triton devices and, once `compact_fused_head_on_cpu` ran (every
        # training stage runs it), on a CPU; TRL's own CPU path scores every position of every row,
        # prompt included (3-5x the head work of the completions' own logits: measured, BENCHMARKS.md)
        fused = fused_head_is_exact(model, self.accelerator) and fused_head_scores_labels_only(
            input_ids.device
        )
        score = self._fused_chunk if fused else self._logits_chunk
        parts = [
            score(
                model,
                input_ids[c],
                attention_mask[c],
                logits_to_keep,
                temps[c],
                compute_entropy,
                compute_aux_loss,
            )
            for c in chunks
        ]
        logps = torch.cat([p[0] for p in parts])
        entropies = torch.cat([p[1] for p in parts]) if compute_entropy else None
        aux = [p[2] for p in parts if p[2] is not None]
        return logps, entropies, (torch.stack(aux).mean() if aux else None)

    def _fused_chunk(self, model, ids, mask, logits_to_keep, temps, compute_entropy, compute_aux_loss):
        """TRL's fused LM head (tiles, no full logits), divided by the temperature it was built with,
        T0: scaling row r's last hidden states by T0 / T_r makes it log_softmax(logits / T_r)
        exactly where the head is linear (no bias, no soft-capping: `fused_head_is_exact`)."""
        scale = float(self.args.temperature) / temps.to(ids.device, torch.float32)

        def scaled(module, args, output):
            output["last_hidden_state"] = output["last_hidden_state"] * scale[:, None, None].to(
                output["last_hidden_state"].dtype
            )
            return output

        handle = backbone(model, self.accelerator).register_forward_hook(scaled)
        try:
            return super()._get_per_token_logps_and_entropies(
                model,
                ids,
                mask,
                logits_to_keep,
                compute_entropy=compute_entropy,
                compute_aux_loss=compute_aux_loss,
            )
        finally:
            handle.remove()

    def _logits_chunk(self, model, ids, mask, logits_to_keep, temps, compute_entropy, compute_aux_loss):
        """The model's own logits of the completion positions, divided per row (any LM head; costs
        rows x completion x vocabulary floats, which the fused head avoids)."""
        from looper.train.grpo_math import tempered_logprobs

        with self.accelerator.autocast():
            # position t's logits predict token t + 1: keep the logits_to_keep + 1 last, drop the final one
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=logits_to_keep + 1).logits[
                :, :-1
            ]
        temps = temps.to(logits.device)
        logps = tempered_logprobs(logits, ids[:, -logits_to_keep:], temps)
        entropy = None
        if compute_entropy:
            with torch.no_grad():
                logp = (logits.float() / temps[:, None, None]).log_softmax(-1)
                entropy = -(logp.exp() * logp).sum(-1)
        return logps, entropy, None


def _unwrapped(model, accelerator):
    model = accelerator.unwrap_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone(model, accelerator):
    """The transformer under the LM head: the module TRL's fused forward calls for hidden states."""
    return _unwrapped(model, accelerator).base_model


def fused_head_is_exact(model, accelerator) -> bool:
    """Whether scaling hidden states divides TRL's fused logits exactly: a linear head (no bias),
    no final soft-capping, and TRL's fused forward installed."""
    inner = _unwrapped(model, accelerator)
    head = inner.get_output_embeddings()
    capped = getattr(inner.config.get_text_config(), "final_logit_softcapping", None)
    return (
        getattr(head, "bias", None) is None
        and capped is None
        and "forward" in vars(inner)  # add_fused_lm_head set the instance's own forward
    )


def fused_head_scores_labels_only(device: torch.device) -> bool:
    """Whether TRL's fused head, on `device`, scores only the labelled positions (its Triton path,
    CUDA/XPU, and a CPU once `compact_fused_head_on_cpu` ran); elsewhere it scores every position
    and masks the prompt's afterwards."""
    import trl.trainer.utils as trl_utils

    return trl_utils._use_triton(device)


def compact_fused_head_on_cpu() -> None:
    """Make TRL's fused LM head score only the labelled positions on a CPU too (idempotent).

    TRL scores every position on devices without Triton, so that the tile shapes stay fixed for a
    graph compiler (its comment names Neuron); a CPU runs eagerly, where a batch's own shapes cost
    nothing, and every unlabelled position is a wasted row of the vocabulary-wide head: in sft the
    prompt is ~3/4 of the tokens (the demo's), so the head did ~4x its work. Only the fused forward's
    `compact` choice reads this name (`trl.trainer.utils`); the kernels keep their own (torch tiles
    on a CPU). The values are the same either way: each position's log-prob is its own row's."""
    import trl.trainer.utils as trl_utils
    from trl.kernels.chunked_logprob import _use_triton

    if getattr(trl_utils._use_triton, "looper_compact", False):
        return

    def use_compact(device: torch.device) -> bool:
        return device.type == "cpu" or _use_triton(device)

    use_compact.looper_compact = True
    trl_utils._use_triton = use_compact


# --------------------------------------------------------------------------- other private reads


def total_train_tokens(trainer: Any) -> int:
    """Tokens TRL counted since this process started training (its count restarts at a resume)."""
    return int(getattr(trainer, "_total_train_tokens", 0))


def loss_sum_since_resume(trainer: Any) -> float:
    """transformers' summed loss of the steps since the resume: the logged part plus the pending one."""
    pending = getattr(trainer, "_tr_loss", None)
    return getattr(trainer, "_total_loss_scalar", 0.0) + (
        float(pending.item()) if pending is not None else 0.0
    )


def log_train_metric(trainer: Any, name: str, value: float) -> None:
    """A value TRL logs with the step's metrics (averaged over the step like its own)."""
    trainer._metrics["train"][name].append(value)


def wrap_optimizer_save(trainer: Any, before) -> None:
    """Call `before()` inside Trainer._save_checkpoint, after the weights and before the optimizer
    and trainer state are written (the fault suite's 'save' kill point)."""
    save_optimizer = trainer._save_optimizer_and_scheduler

    def save(*args, **kwargs):
        before()
        return save_optimizer(*args, **kwargs)

    trainer._save_optimizer_and_scheduler = save
