from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from looper.errors import LooperError
from looper.store.artifacts import Artifact, Store, atomic_write_bytes, read_rows, write_jsonl, write_parquet

SCHEMA = pa.schema([("id", pa.string()), ("x", pa.int64())])


def test_tables_roundtrip_parquet_and_jsonl(tmp_path):
    rows = [{"id": "a", "x": 1}, {"id": "b", "x": 2}]
    write_parquet(tmp_path / "t.parquet", rows, SCHEMA)
    write_jsonl(tmp_path / "t.jsonl", rows)
    assert read_rows(tmp_path / "t.parquet") == rows == read_rows(tmp_path / "t.jsonl")
    assert oct(os.stat(tmp_path / "t.parquet").st_mode & 0o777) != oct(0o600)


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    atomic_write_bytes(target, b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temp file left behind


def commit(store, stage="prepare", version="v1", content=b"x", inputs=None):
    run = store.begin(stage, version)
    (run.path / "rows.jsonl").write_bytes(content)
    return run.commit(config={}, inputs=inputs or {}, identity={}, counts={"rows": 1})


def test_commit_publishes_atomically_and_sets_latest(tmp_path):
    store = Store(tmp_path)
    art = commit(store)
    assert art.path == tmp_path / "data" / "prepare" / "v1"
    assert not (tmp_path / "data" / "prepare" / "v1.partial").exists()
    assert store.latest("prepare") == "v1"
    assert store.resolve("prepare").version == "v1"
    assert store.resolve("prepare", "v1").path == art.path
    assert store.resolve("prepare", str(art.path)).version == "v1"
    manifest = json.loads((art.path / "manifest.json").read_text())
    assert manifest["stage"] == "prepare" and manifest["schema_version"] == 1
    assert "transformers" in manifest["packages"] and len(manifest["hash"]) == 64


def test_partial_run_is_never_resolved(tmp_path):
    store = Store(tmp_path)
    run = store.begin("prepare", "v1")
    (run.path / "rows.jsonl").write_bytes(b"half")  # crash before commit
    with pytest.raises(LooperError, match="run `looper prepare` first"):
        store.resolve("prepare")
    assert store.find("prepare", "v1") is None


def test_content_hash_and_version(tmp_path):
    store = Store(tmp_path)
    a = commit(store, version="v1", content=b"x")
    b = commit(store, version="v2", content=b"y")
    assert a.hash != b.hash
    assert store.version_for("sft", {"lr": 1}, {"prepare": a}) == store.version_for(
        "sft", {"lr": 1}, {"prepare": a}
    )
    assert store.version_for("sft", {"lr": 1}, {"prepare": a}) != store.version_for(
        "sft", {"lr": 1}, {"prepare": b}
    )
    assert store.version_for("sft", {"lr": 1}, {"prepare": a}) != store.version_for(
        "sft", {"lr": 2}, {"prepare": a}
    )


def test_inputs_lineage_and_model_stage_alias(tmp_path):
    store = Store(tmp_path)
    prep = commit(store)
    sft = commit(store, stage="sft", version="s1", inputs={"prepare": prep})
    assert sft.path == tmp_path / "checkpoints" / "sft" / "s1"
    assert sft.manifest["inputs"]["prepare"]["version"] == "v1"
    alias = tmp_path / "checkpoints" / "sft_lora"
    assert alias.is_symlink() and alias.resolve() == sft.path


def test_force_replaces_existing_version(tmp_path):
    store = Store(tmp_path)
    commit(store, content=b"x")
    art = commit(store, content=b"y")
    assert (art.path / "rows.jsonl").read_bytes() == b"y"


def test_reader_refuses_newer_schema(tmp_path):
    store = Store(tmp_path)
    art = commit(store)
    manifest = json.loads((art.path / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (art.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LooperError, match="schema_version 99"):
        Artifact.load(art.path)


def test_resolve_wrong_stage_and_unknown_version(tmp_path):
    store = Store(tmp_path)
    art = commit(store)
    with pytest.raises(LooperError, match="is a prepare artifact, expected sft"):
        store.resolve("sft", str(art.path))
    with pytest.raises(LooperError, match="no prepare version 'zzz'"):
        store.resolve("prepare", "zzz")
