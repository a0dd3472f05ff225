"""`looper ppo`: offline policy optimisation on scored rollouts (GRPO-style), via TRL.

    looper ppo                                  # replay the latest rollouts, per-arm rewards
    looper ppo --reward question                # the reference recipe's shared question reward
    looper ppo --online --limit 200             # online GRPO: sample fresh groups each step

Offline (default), nothing is generated: TRL's `GRPOTrainer` gets a `rollout_func` that
hands back the stored completions of each question's arms (their exact prompts, token ids
and log-probs). Objective: the clipped PPO surrogate with group-relative advantages over
the arms of a question, plus a per-token KL penalty to the reference policy. Each completion
is trained at the temperature its arm sampled it with: its log-probs, the behaviour log-probs
and the reference's are all log_softmax(logits / T_arm) (TRL's convention, per row here).

What we add to TRL, and why (`looper.train.grpo`; TRL's private methods in `looper.train.trl_internals`):
- Per-row temperatures: a low-temperature arm's completion trained at T = 1 would mostly sharpen
  the T = 1 policy towards its mode, which moves no greedy answer; trained at its own T the
  gradient is that of the distribution it was drawn from.
- `ReplayGRPOTrainer`: TRL uses stored log-probs only on its vLLM path. We set the
  importance ratio's denominator (`old_per_token_logps`) to the stored log-probs, so the
  ratio is taken against the behaviour policy that produced the rollouts and clipping
  bounds how far training moves from it. With `--reward question` every arm of a question
  shares one reward, so group-relative advantages would all be zero: we centre (and scale)
  rewards over the batch instead. `--behaviour-logprobs recompute` (or `auto`, when the rollouts
  were sampled with other weights: vLLM bf16 for an NF4 policy, or are older than schema 4,
  whose log-probs were untempered) scores the stored completions with the training model before
  any update, at their arms' temperatures, and takes the ratio against those: the reference pass
  TRL runs for the KL is that model (the frozen copy of the adapter, or the base under a fresh
  LoRA), so its log-probs are taken, batch by batch, for the rows trained and no others.
- `AdaptiveKLGRPOTrainer`: TRL's KL coefficient is fixed; we move it after every optimizer step
  towards `--kl-target` (nats per token) with `looper.train.grpo_math.AdaptiveKL`, saved with each checkpoint;
  advantages divide by a floored group std (`--advantage-std-floor`); dropout is off in every
  forward (TRL's `disable_dropout`), so the ratio and the KL measure policy change, not noise.

Reference and adapter: the reference policy is the one that generated the rollouts. From an
sft adapter, training continues that adapter and TRL keeps a frozen copy as the reference;
from the base model, a fresh LoRA is trained and the reference is the base (adapter off).
A completion's EOS token is part of its stored token ids and log-probs (rollouts schema 2), so
the model is trained to stop where its rewarded completions stopped; older rollouts are refused.
"""

from __future__ import annotations

from looper.config import PpoConfig
from looper.errors import LooperError
from looper.policy import models
from looper.rewards.registry import reads_s_cf
from looper.rewards.trainer_adapter import (
    ppo_identity,
    reward_plan,
    row_components,
    stored_reward_funcs,
)
from looper.stages import StageResult
from looper.store.artifacts import Store
from looper.train import runner
from looper.train.grpo import (
    ReplayGRPOTrainer,
    announce_plan,
    arm_temperatures,
    build_trainer,
    prompt_encoder,
    recompute_behaviour_logprobs,
    replay_func,
)
from looper.train.grpo_math import (
    behaviour_logprobs_source,
    skip_flat,
    step_plan,
    with_tokens,
)

STAGE = "ppo"


def run(config: PpoConfig) -> StageResult:
    if config.online:
        from looper.stages.ppo_online import run_online

        return run_online(config)
    if config.reward not in ("arm", "question", "correctness"):
        raise LooperError(f"--reward {config.reward}: choose arm, question or correctness")
    store = Store(config.workdir, wait=config.wait)
    rollouts, base, quant = runner.rollouts_input(store, config)
    rewards_plan = reward_plan(
        config.rewards, config.weights, config.reward, rollouts.manifest.get("config", {})
    )
    if rollouts.manifest.get("sampling", {}).get("cf_skipped") and reads_s_cf(
        rewards_plan.names, rewards_plan.spec.params
    ):
        raise LooperError(
            f"rollouts {rollouts.version} skipped their s_cf re-asks (no reward they stored weighed s_cf), "
            "but ppo's rewards read s_cf: set those weights to 0, or rerun `looper rollouts` with them"
        )
    stage_identity = ppo_identity(config, rewards_plan) | {"model": base.identity, "quant": quant}
    version = store.version_for(STAGE, stage_identity, {"rollouts": rollouts})
    if existing := store.reuse(STAGE, version, config.force):
        return StageResult.up_to_date(existing)

    if rollouts.manifest.get("schema_version", 1) < 2:
        raise LooperError(
            f"rollouts {rollouts.version} are schema {rollouts.manifest.get('schema_version', 1)}: "
            "written before the EOS token was stored, so replay would never train stopping; "
            "rerun `looper rollouts`"
        )
    rows, empty = with_tokens(runner.rollout_rows(rollouts))
    training_weights = {
        "backend": "hf",
        "quant": quant,
        "dtype": runner.training_weights_dtype(config),
    }
    behaviour, why = behaviour_logprobs_source(
        config.behaviour_logprobs,
        rollouts.manifest.get("generated_by"),
        training_weights,
        rollouts.manifest.get("schema_version", 1),
    )
    n_arms = len(rows[0]["arm_outputs"])
    if n_arms < 2:
        raise LooperError(
            "rollouts with one arm give no group to compare: rerun `looper rollouts --arms 2` or more"
        )
    components = row_components(rows, rewards_plan, rollouts.manifest, config.reward)
    flat_ids = {r["id"] for r in rows if len({tuple(c.values()) for c in components[r["id"]]}) <= 1}
    flat = len(flat_ids)
    print(
        f"ppo: {len(rows)} questions x {n_arms} arms; {flat} question group(s) have zero reward variance"
        + (" (they teach nothing under --reward arm)" if config.reward == "arm" else "")
    )
    rolled_out = len(rows)
    if config.skip_flat_groups:
        rows = skip_flat(rows, flat_ids, config.reward)
    plan = step_plan(len(rows), config.questions_per_step, config.questions_per_minibatch)
    announce_plan(plan, len(rows), config.questions_per_step)

    from datasets import Dataset

    # the rollouts' adapter, found in this home and checked against --model before anything is written
    adapter_path, base_mismatch = runner.rollouts_adapter(store, rollouts, base, config)
    tokenizer = models.load_tokenizer(base, trust_remote_code=config.trust_remote_code)
    model, peft_config = runner.policy_model(config, base, adapter_path, quant)
    job = runner.TrainingRun.begin(store, STAGE, version, config, base=base, quant=quant)  # once loaded
    max_completion = max(len(a["token_ids"]) for r in rows for a in r["arm_outputs"])
    trainer = build_trainer(
        ReplayGRPOTrainer,
        config,
        job,
        plan,
        rewards_plan,
        generations=n_arms,
        max_completion=max_completion,
        model=model,
        reward_funcs=stored_reward_funcs(rewards_plan.names),
        train_dataset=Dataset.from_list([{"prompt": r["id"]} for r in rows]),
        processing_class=tokenizer,
        peft_config=peft_config,
        rollout_func=replay_func(rows, tokenizer, n_arms, components),
        temperatures=arm_temperatures(rows),
        reward_mode=config.reward,
    )
    gap = None
    # The recompute: the reference pass TRL runs for the KL scores each trained batch with the policy
    # before any update, so it stands in for a pass of its own over every stored row (3x the rows the
    # demo's 2 steps train); without that reference (--kl-coef 0), one eager pass before train(),
    # where a resumed run has not yet loaded its checkpoint's weights.
    trainer.behaviour_from_reference = behaviour == "recompute" and trainer.reference_is_initial_policy()
    if behaviour == "recompute" and not trainer.behaviour_from_reference:
        gap = recompute_behaviour_logprobs(
            trainer, rows, prompt_encoder(tokenizer), config.questions_per_minibatch * n_arms
        )
    print(
        f"ppo: behaviour log-probs {behaviour} ({why})"
        + (f"; mean |stored - recomputed| = {gap:.3g} nats per token" if gap is not None else "")
        + ("; recomputed by the reference pass of each step" if trainer.behaviour_from_reference else "")
    )
    result = job.train(trainer)
    if trainer.behaviour_from_reference:
        gap = trainer.behaviour_gap()
        print(f"ppo: mean |stored - recomputed| = {gap:.3g} nats per token over the trained completions")
    return job.finish(
        trainer,
        tokenizer,
        inputs={"rollouts": rollouts},
        identity=stage_identity,
        counts={
            "questions": rolled_out,
            "arms": n_arms,
            "zero_variance_groups": flat,
            "trained_questions": len(rows),
            "skipped_empty": empty,
            "steps": trainer.state.global_step,
        },
        metrics={
            "train_loss": job.train_loss(result, trainer),
            "final_kl_coef": trainer.kl_controller.coef,
            "behaviour_logprob_gap": gap,
        },
        extra={
            "reference": store.relative(adapter_path) if adapter_path else "base",
            "base_mismatch_allowed": base_mismatch,
            "loss_type": config.loss_type,
            "reward": config.reward,
            "rewards": rewards_plan.identity(),
            "behaviour_logprobs": behaviour,
        },
    )
