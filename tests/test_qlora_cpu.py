"""QLoRA for real on this CPU: sft, ppo and dpo with `--quant 4bit` through bitsandbytes.

The GPU recipe's path - NF4 weights with double quantisation, bfloat16 compute, a float32 LoRA,
paged 8-bit AdamW - on the tiny model, through the CLI; bitsandbytes (>= 0.50) runs NF4
`Linear4bit` forward/backward and `PagedAdamW8bit` on a CPU. Each trained adapter loads back
onto the 4-bit base and changes its output. Slow tier, and skipped where bitsandbytes is not
installed (the CPU .venv): `make test-gpu-stack` and `make test-vllm-cpu` run it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import last_json
from test_dpo import FAST as DPO_FAST
from test_ppo import FAST as PPO_FAST
from test_ppo import build_rollouts

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("bitsandbytes") is None,
        reason="bitsandbytes is not installed (the CPU .venv); make test-gpu-stack / test-vllm-cpu have it",
    ),
]


def four_bit_logits(model_dir: Path, adapter: str | None) -> torch.Tensor:
    """Logits of a fixed input through the NF4 base (and `adapter` on it), as the stages load them."""
    import bitsandbytes as bnb

    from looper.policy import models

    source = models.ModelSource(str(model_dir), str(model_dir), "t")
    model = models.load_model(source, quant="4bit")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    weight = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)).weight
    assert weight.quant_state.quant_type == "nf4" and weight.quant_state.nested  # double quantisation
    if adapter is not None:
        model = models.attach_adapter(model, adapter, source, trainable=False, allow_base_mismatch=True)
    with torch.inference_mode():
        return model.eval()(torch.tensor([[5, 6, 7, 8, 9, 10]])).logits.float()


def check_manifest(result: dict) -> dict:
    manifest = json.loads((Path(result["path"]) / "manifest.json").read_text())
    assert (manifest["quant"], manifest["optimizer"]) == ("4bit", "paged_adamw_8bit")
    return manifest


def test_sft_in_4bit(run_cli, tiny_model_dir, tmp_path):
    code, _, err = run_cli(
        "prepare", "--source", "synthetic", "--synthetic-train", "20", "--synthetic-test", "4",
        "--workdir", tmp_path,
    )  # fmt: skip
    assert code == 0, err
    code, out, err = run_cli(
        "sft", "--model", tiny_model_dir, "--workdir", tmp_path, "--quant", "4bit", "--max-steps", "3",
        "--limit", "6", "--grad-accum", "1", "--learning-rate", "1e-2", "--dev-limit", "2", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert "sft: quant 4bit: NF4 weights with double quantisation" in out
    result = last_json(out)
    check_manifest(result)
    assert result["metrics"]["dev_loss"] < result["metrics"]["dev_loss_before"]
    base, trained = four_bit_logits(tiny_model_dir, None), four_bit_logits(tiny_model_dir, result["path"])
    assert (trained - base).abs().max() > 1e-3  # the adapter loads back and moves the 4-bit model


def test_ppo_and_dpo_in_4bit(run_cli, tiny_model_dir, tmp_path):
    build_rollouts(tmp_path, tiny_model_dir)  # 2 questions x 4 arms, sampled by hf float32
    code, out, err = run_cli(
        "ppo", "--model", tiny_model_dir, "--workdir", tmp_path, *PPO_FAST, "--quant", "4bit",
        "--max-steps", "1", "--learning-rate", "1e-2", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert "behaviour log-probs recompute" in out and "quant none vs 4bit" in out
    manifest = check_manifest(last_json(out))
    assert manifest["behaviour_logprobs"] == "recompute"
    ppo = last_json(out)["path"]
    code, out, err = run_cli(
        "dpo", "--model", tiny_model_dir, "--workdir", tmp_path, *DPO_FAST, "--quant", "4bit",
        "--max-steps", "2", "--learning-rate", "1e-2", "--json",
    )  # fmt: skip
    assert code == 0, err
    check_manifest(last_json(out))
    base = four_bit_logits(tiny_model_dir, None)
    for adapter in (ppo, last_json(out)["path"]):
        assert (four_bit_logits(tiny_model_dir, adapter) - base).abs().max() > 1e-4
