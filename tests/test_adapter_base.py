"""Adapters are checked against --model from their adapter_config.json, with or without a Looper
manifest beside them; --allow-base-mismatch lets a mismatch through and the manifest says so;
tensors that do not fit are one line, before any work starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import last_json

from looper.errors import LooperError
from looper.policy.models import check_adapter_base, check_adapter_fits, linear_shapes, resolve_model


def bare_adapter(path: Path, model_dir: Path, base_name: str | None = None) -> Path:
    """A PEFT adapter made on `model_dir` (no Looper manifest); adapter_config.json names `base_name`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    model.save_pretrained(path)
    if base_name is not None:
        config_file = path / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config_file.write_text(json.dumps(config | {"base_model_name_or_path": base_name}))
    return path


def test_bare_adapter_of_another_base_is_refused(tmp_path, tiny_model_dir):
    adapter = bare_adapter(tmp_path / "a", tiny_model_dir, "org/other-model")
    base = resolve_model(str(tiny_model_dir))
    with pytest.raises(
        LooperError, match=r"trained on base 'org/other-model' \(its adapter_config.json\)"
    ) as exc:
        check_adapter_base(adapter, base)
    assert "--allow-base-mismatch" in str(exc.value) and "\n" not in str(exc.value)
    allowed = check_adapter_base(adapter, base, allow_mismatch=True)
    assert "org/other-model" in allowed


def test_same_base_passes_by_path_and_by_cache_name_on_another_box(tmp_path, tiny_model_dir):
    base = resolve_model(str(tiny_model_dir))
    assert check_adapter_base(bare_adapter(tmp_path / "a", tiny_model_dir), base) is None  # PEFT's own record
    tiny = resolve_model("looper:tiny")  # a cache entry, named by content: another box's path names it too
    moved = bare_adapter(tmp_path / "b", Path(tiny.path), "/home/someone/.cache/looper/tiny-v1")
    assert check_adapter_base(moved, tiny) is None
    elsewhere = bare_adapter(tmp_path / "c", Path(tiny.path), "/home/someone/models/tiny-v2")
    with pytest.raises(LooperError, match="tiny-v2"):
        check_adapter_base(elsewhere, tiny)


def test_manifest_beside_the_adapter_decides(tmp_path, tiny_model_dir):
    adapter = bare_adapter(tmp_path / "a", tiny_model_dir, "/some/other/box/path")
    base = resolve_model(str(tiny_model_dir))
    (adapter / "manifest.json").write_text(json.dumps({"base_model": {"identity": base.identity}}))
    assert check_adapter_base(adapter, base) is None


def test_shapes_that_do_not_fit_are_one_whole_line(tmp_path, tiny_model_dir):
    from looper.policy.tiny import tiny_model

    narrow = tiny_model(tmp_path / "narrow", hidden_size=32)
    adapter = bare_adapter(tmp_path / "a", narrow)
    base = resolve_model(str(tiny_model_dir))
    with pytest.raises(LooperError) as exc:
        check_adapter_fits(adapter, base, linear_shapes(source=base))
    message = str(exc.value)
    assert "\n" not in message
    assert "8 of 8 LoRA tensors differ in shape" in message
    assert "model.layers.0.self_attn.q_proj.lora_A.weight has shape [4, 32]: in_features 32" in message
    check_adapter_fits(bare_adapter(tmp_path / "b", tiny_model_dir), base, linear_shapes(source=base))


@pytest.mark.slow
def test_eval_and_rollouts_check_a_bare_adapter(run_cli, tmp_path, tiny_model_dir):
    adapter = bare_adapter(tmp_path / "other", tiny_model_dir, "org/other-model")
    home = tmp_path / "home"
    assert (
        run_cli(
            "prepare",
            "--source",
            "synthetic",
            "--synthetic-train",
            "8",
            "--synthetic-test",
            "2",
            "--workdir",
            home,
        )[0]
        == 0
    )
    common = [
        "--model",
        tiny_model_dir,
        "--workdir",
        home,
        "--max-new-tokens",
        "4",
        "--backend",
        "hf",
        "--json",
    ]
    code, _, err = run_cli("rollouts", "--policy", adapter, "--limit", "1", "--arms", "2", *common)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "org/other-model" in err
    assert not (home / "data" / "rollouts").exists()
    code, _, err = run_cli(
        "eval", "--compare", f"base,{adapter}", "--limit", "1", "--bootstrap", "10", *common
    )
    assert code == 1 and "--allow-base-mismatch" in err and not (home / "data" / "eval").exists()
    code, out, err = run_cli(
        "eval",
        "--compare",
        f"base,{adapter}",
        "--limit",
        "1",
        "--bootstrap",
        "10",
        "--allow-base-mismatch",
        *common,
    )
    assert code == 0, err
    manifest = json.loads((Path(last_json(out)["path"]) / "manifest.json").read_text())
    # a bare adapter is named by its content (`adapter:<hash>`), never by its path
    (bare,) = [entry for name, entry in manifest["models"].items() if name.startswith("adapter:")]
    assert "org/other-model" in bare["base_mismatch_allowed"]
    assert manifest["models"]["base"]["base_mismatch_allowed"] is None
