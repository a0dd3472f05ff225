"""TRL's fused LM head made compact on a CPU (`compact_fused_head_on_cpu`): the same log-probs, loss
and gradients as TRL's every-position path, from the labelled rows only."""

from __future__ import annotations

import pytest
import torch


def fused_outputs(model_dir, compact: bool):
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM
    from trl.kernels.chunked_logprob import _use_triton
    from trl.trainer.utils import add_fused_lm_head

    from looper.train.trl_internals import compact_fused_head_on_cpu, fused_head_scores_labels_only

    saved = trl_utils._use_triton
    try:
        trl_utils._use_triton = _use_triton  # TRL's own choice: every position on a CPU
        if compact:
            compact_fused_head_on_cpu()
            compact_fused_head_on_cpu()  # idempotent: wraps TRL's function once
            assert trl_utils._use_triton(torch.device("cpu"))
        assert fused_head_scores_labels_only(torch.device("cpu")) == compact
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        ids = torch.randint(3, model.config.vocab_size, (3, 12))
        labels = ids.clone()
        labels[0, :7] = labels[1, :4] = labels[2, :10] = -100  # prompts of 7, 4 and 10 tokens
        labels[1, 9:] = -100  # and a padded row
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads
    finally:
        trl_utils._use_triton = saved


def test_compact_head_scores_like_every_position(tiny_model_dir):
    every, every_grads = fused_outputs(tiny_model_dir, compact=False)
    compact, compact_grads = fused_outputs(tiny_model_dir, compact=True)
    mask = every.label_mask
    assert mask.sum() == 5 + 5 + 2  # labelled tokens 7-11, 4-8 and 10-11
    torch.testing.assert_close(compact.log_probs, every.log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compact.entropy, every.entropy, atol=1e-5, rtol=1e-5)
    assert torch.equal(compact.is_top1, every.is_top1)
    assert (compact.log_probs[~mask] == 0).all() and (compact.log_probs[mask] < 0).all()
    assert compact.loss.item() == pytest.approx(every.loss.item(), abs=1e-6)
    assert compact_grads.keys() == every_grads.keys() and compact_grads
    for name, grad in every_grads.items():
        torch.testing.assert_close(compact_grads[name], grad, atol=1e-5, rtol=1e-4)
