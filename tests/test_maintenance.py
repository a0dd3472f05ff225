"""`looper export` and `looper gc`."""

from __future__ import annotations

import torch

from looper.store.artifacts import Store


def commit(store, stage, version, inputs=None):
    run = store.begin(stage, version)
    (run.path / "x.bin").write_bytes(version.encode() * 1000)
    return run.commit(config={}, inputs=inputs or {}, identity={})


def test_gc_keeps_latest_and_what_kept_artifacts_depend_on(run_cli, tmp_path):
    store = Store(tmp_path)
    p1 = commit(store, "prepare", "p1")
    s1 = commit(store, "sft", "s1", {"prepare": p1})
    commit(store, "prepare", "p2")
    commit(store, "prepare", "p3")
    s2 = commit(store, "sft", "s2", {"prepare": p1})
    assert store.latest("prepare") == "p3" and s2
    code, out, _ = run_cli("gc", "--keep", "1", "--workdir", tmp_path)
    assert code == 0 and "freed" in out
    left = {p.name for p in (tmp_path / "data" / "prepare").iterdir() if p.is_dir()}
    assert left == {"p1", "p3"}  # p3 latest; p1 is s2's input; p2 removed
    assert not s1.path.exists() and s2.path.exists()


def test_export_merges_adapter_into_standalone_model(run_cli, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from looper.config import PrepareConfig
    from looper.stages import prepare

    prepare.run(
        PrepareConfig(source="synthetic", synthetic_train=20, synthetic_test=4, workdir=str(tmp_path))
    )
    code, out, err = run_cli(
        "sft",
        "--model",
        tiny_model_dir,
        "--workdir",
        tmp_path,
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--grad-accum",
        "1",
        "--learning-rate",
        "1e-2",
        "--dev-limit",
        "2",
        "--no-gradient-checkpointing",
        "--json",
    )
    assert code == 0, err
    code, out, err = run_cli(
        "export", "--model", "sft", "--out", tmp_path / "exported", "--workdir", tmp_path
    )
    assert code == 0, err
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    assert (tmp_path / "exported" / "looper_manifest.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "exported")
    ids = tokenizer("Ann has 3 apples", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(exported(ids).logits, base(ids).logits)  # the adapter is in the weights
    code, _, err = run_cli("export", "--model", "sft", "--out", tmp_path / "exported", "--workdir", tmp_path)
    assert code == 1 and "exists" in err
    code, _, err = run_cli("export", "--model", "ppo", "--out", tmp_path / "x", "--workdir", tmp_path)
    assert code == 1 and "run `looper ppo` first" in err
