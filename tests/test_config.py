from __future__ import annotations

import pytest

from looper.config import PrepareConfig, build_config, identity, read_pipeline_file
from looper.errors import LooperError


def write(tmp_path, text):
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


def test_precedence_default_file_cli(tmp_path, monkeypatch):
    monkeypatch.delenv("LOOPER_HOME", raising=False)
    file_values = read_pipeline_file(write(tmp_path, "[common]\nseed = 3\n[prepare]\nlimit = 7\n"))["prepare"]
    config = build_config(PrepareConfig, file_values=file_values, cli_values={"seed": 5, "limit": None})
    assert (config.seed, config.limit, config.source) == (5, 7, "hub")


def test_looper_home_between_file_and_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPER_HOME", "/env/home")
    assert build_config(PrepareConfig, file_values={"workdir": "/file"}, cli_values={}).workdir == "/env/home"
    assert build_config(PrepareConfig, file_values={}, cli_values={"workdir": "/cli"}).workdir == "/cli"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[prepare]\nsede = 1\n", "unknown key 'sede' in [prepare]"),
        ("[prepar]\nseed = 1\n", "unknown table [prepar]"),
        ("[common]\nnope = 1\n", "unknown key 'nope' in [common]"),
        ("[prepare]\nseed = 'x'\n", "seed = 'x' is not a valid"),
        ("[prepare\n", "not valid TOML"),
    ],
)
def test_bad_pipeline_files(tmp_path, text, fragment):
    with pytest.raises(LooperError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        read_pipeline_file(write(tmp_path, text))


def test_identity_leaves_out_run_options():
    ident = identity(PrepareConfig(workdir="/x", force=True, json=True))
    assert "workdir" not in ident and "json" not in ident and "force" not in ident
    assert ident["seed"] == 0 and ident["source"] == "hub"
