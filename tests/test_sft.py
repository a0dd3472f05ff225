"""`looper sft` on the tiny random model, through the real CLI and TRL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import last_json
from safetensors.torch import load_file

from looper.config import SftConfig

FAST = [
    "--batch-size",
    "4",
    "--grad-accum",
    "1",
    "--dev-limit",
    "4",
    "--eval-steps",
    "100",
    "--save-steps",
    "100",
    "--no-gradient-checkpointing",
]

# Shaped like the DeepSeek-R1 distill template: it deletes reasoning from assistant turns
# and pre-fills "<think>\n" after the generation prompt.
R1_LIKE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '<|im_start|>User: ' + m['content'] }}{% endif %}"
    "{% if m['role'] == 'assistant' %}{% set c = m['content'] %}{% if '</think>' in c %}"
    "{% set c = c.split('</think>')[-1] %}{% endif %}{{ '<|im_start|>Assistant: ' + c + eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>Assistant: <think>\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A work dir with a small synthetic prepare artifact (40 train, 10 dev)."""
    from looper.config import PrepareConfig
    from looper.stages import prepare

    workdir = tmp_path_factory.mktemp("work")
    prepare.run(
        PrepareConfig(source="synthetic", synthetic_train=50, synthetic_test=10, workdir=str(workdir))
    )
    return workdir


def sft_args(workdir, model, *extra):
    return ["sft", "--model", model, "--workdir", workdir, *FAST, *extra, "--json"]


def metric_rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # 25 steps; test_adapter_reloads_and_generates is sft's fast CLI test
def test_sft_lowers_loss_and_writes_adapter(run_cli, prepared, tiny_model_dir, tmp_path):
    workdir = tmp_path / "w"
    import shutil

    shutil.copytree(prepared, workdir)
    code, out, err = run_cli(
        *sft_args(
            workdir,
            tiny_model_dir,
            "--limit",
            "8",
            "--max-steps",
            "25",
            "--learning-rate",
            "1e-2",
            "--lora-r",
            "16",
        )
    )
    assert code == 0, err
    result = last_json(out)
    assert result["counts"]["steps"] == 25 and result["counts"]["train_questions"] == 8
    losses = [
        r["loss"] for r in metric_rows(workdir / "checkpoints" / "sft" / result["version"]) if "loss" in r
    ]
    assert len(losses) == 25
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.2, (first, last)  # learning 8 repeated solutions (from ~ln 512)
    manifest = json.loads((workdir / "checkpoints" / "sft" / result["version"] / "manifest.json").read_text())
    assert manifest["inputs"]["prepare"]["version"] and manifest["base_model"]["identity"].startswith("dir:")
    assert (workdir / "checkpoints" / "sft_lora").resolve().name == result["version"]
    assert not (workdir / "checkpoints" / "sft" / result["version"] / "trainer").exists()

    code, out, _ = run_cli(
        *sft_args(
            workdir,
            tiny_model_dir,
            "--limit",
            "8",
            "--max-steps",
            "25",
            "--learning-rate",
            "1e-2",
            "--lora-r",
            "16",
        )
    )
    assert code == 0 and last_json(out)["skipped"]  # a finished version is not trained again


def test_adapter_reloads_and_generates(run_cli, prepared, tiny_model_dir, tmp_path):
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir = tmp_path / "w"
    shutil.copytree(prepared, workdir)
    code, out, err = run_cli(
        *sft_args(workdir, tiny_model_dir, "--max-steps", "3", "--learning-rate", "1e-2")
    )
    assert code == 0, err
    adapter = last_json(out)["path"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(base, adapter)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained away from PEFT's zero init
    inputs = tokenizer("Problem: 2 + 3", return_tensors="pt")
    out_ids = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out_ids.shape[1] > inputs["input_ids"].shape[1]


def test_prompt_tokens_carry_no_loss(prepared, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from looper.data.prompts import render_prompt
    from looper.store.artifacts import Store, read_rows
    from looper.train.sft import build_trainer

    rows = read_rows(Store(prepared).resolve("prepare").path / "train.parquet")[:2]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer = build_trainer(
        SftConfig(model=str(tiny_model_dir), gradient_checkpointing=False),
        tmp_path,
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        tokenizer,
        rows,
        [],
    )
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    n_prompt = len(
        tokenizer(render_prompt(tokenizer, rows[0]["prompt"]), add_special_tokens=False)["input_ids"]
    )
    assert (labels[:n_prompt] == -100).all()
    assert (labels[n_prompt:] != -100).all()
    assert tokenizer.decode(ids[n_prompt:]) == rows[0]["solution"] + tokenizer.eos_token


def test_reasoning_template_keeps_the_solution(prepared, tiny_model_dir, tmp_path):
    """With an R1-style template the worked steps must reach the model inside <think>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from looper.store.artifacts import Store, read_rows
    from looper.train.sft import build_trainer

    rows = read_rows(Store(prepared).resolve("prepare").path / "train.parquet")[:1]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = R1_LIKE_TEMPLATE
    trainer = build_trainer(
        SftConfig(model=str(tiny_model_dir), gradient_checkpointing=False),
        tmp_path,
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        tokenizer,
        rows,
        [],
    )
    batch = trainer.data_collator([trainer.train_dataset[0]])
    trained = tokenizer.decode(batch["input_ids"][0][batch["labels"][0] != -100])
    steps, _, gold = rows[0]["solution"].rpartition("####")
    prompt_text = tokenizer.decode(batch["input_ids"][0][batch["labels"][0] == -100])
    assert prompt_text.endswith("Assistant: <think>\n")
    assert trained == f"{steps.strip()}\n</think>\n\n#### {gold.strip()}{tokenizer.eos_token}"


@pytest.mark.slow  # trains 6 steps twice
def test_resume_matches_uninterrupted(run_cli, prepared, tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from trl import SFTTrainer as Trainer

    common = ["--max-steps", "6", "--save-steps", "3", "--learning-rate", "1e-2"]
    straight, broken = tmp_path / "a", tmp_path / "b"
    shutil.copytree(prepared, straight)
    shutil.copytree(prepared, broken)
    code, out, err = run_cli(*sft_args(straight, tiny_model_dir, *common))
    assert code == 0, err
    reference = load_file(f"{last_json(out)['path']}/adapter_model.safetensors")

    original_step = Trainer.training_step
    calls = {"n": 0}

    def crash_after_four(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # the box dies during step 5, after checkpoint-3
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", crash_after_four)
    code, _, err = run_cli(*sft_args(broken, tiny_model_dir, *common))
    assert code == 130 and "resumes it" in err
    partial = next((broken / "checkpoints" / "sft").glob("*.partial"))
    assert (partial / "trainer" / "checkpoint-3").is_dir()
    monkeypatch.setattr(Trainer, "training_step", original_step)

    code, out, err = run_cli(*sft_args(broken, tiny_model_dir, *common))
    assert code == 0, err
    assert "resuming from checkpoint-3" in out
    resumed = load_file(f"{last_json(out)['path']}/adapter_model.safetensors")
    assert resumed.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=1e-4, atol=1e-6)


def test_sft_errors(run_cli, tmp_path, tiny_model_dir, prepared, monkeypatch):
    code, _, err = run_cli("sft", "--model", tiny_model_dir, "--workdir", tmp_path / "empty")
    assert code == 1 and "run `looper prepare` first" in err
    code, _, err = run_cli("sft", "--model", tmp_path / "missing-model", "--workdir", prepared)
    assert code == 1 and "missing-model" in err and len(err.strip().splitlines()) == 1
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a),
    )
    code, _, err = run_cli("sft", "--model", tiny_model_dir, "--workdir", prepared, "--quant", "4bit")
    assert code == 1 and "pip install 'looper[qlora]'" in err


def test_padding_free_refused_without_flash_attention(run_cli, prepared, tiny_model_dir):
    code, _, err = run_cli("sft", "--model", tiny_model_dir, "--workdir", prepared, "--padding-free")
    assert code == 1 and "--padding-free needs FlashAttention" in err


def test_continue_from_trains_the_sft_adapter_on_more_gold(run_cli, tiny_model_dir, tmp_path):
    """The gold-SFT control: --continue-from keeps training an sft adapter; it is an input of the version."""
    from looper.config import PrepareConfig
    from looper.stages import prepare

    prepare.run(
        PrepareConfig(source="synthetic", synthetic_train=12, synthetic_test=2, workdir=str(tmp_path))
    )
    code, out, err = run_cli(*sft_args(tmp_path, tiny_model_dir, "--max-steps", "2"))
    assert code == 0, err
    first = last_json(out)
    more = sft_args(
        tmp_path,
        tiny_model_dir,
        "--continue-from",
        first["version"],
        "--limit",
        "4",
        "--epochs",
        "1",
        "--warmup-ratio",
        "0",
    )
    code, out, err = run_cli(*more)
    assert code == 0, err
    second = last_json(out)
    manifest = json.loads((Path(second["path"]) / "manifest.json").read_text())
    assert manifest["inputs"]["sft"]["version"] == first["version"] and second["version"] != first["version"]
    before = (Path(first["path"]) / "adapter_model.safetensors").read_bytes()
    assert (Path(second["path"]) / "adapter_model.safetensors").read_bytes() != before
    code, out, _ = run_cli(*more)
    assert code == 0 and last_json(out)["skipped"]
