"""--scheduler continuous (looper.generation.continuous) against the static `generate` path on the tiny model.

Same fixture as test_generation (weights scaled up so greedy outputs vary with the context and the
argmax is well separated): every difference between the schedulers shows up as different tokens.
"""

from __future__ import annotations

import pytest
import torch

from looper.errors import LooperError
from looper.generation import Sampling
from looper.generation.factory import make_generator

QUESTIONS = [
    "x",
    "What is 2+2?",
    "Ann has 5 apples and buys 3 more. How many apples does she have now?",
    "Tom reads 12 pages a day for 3 days, then 7 more pages. How many pages did he read in total?",
    "Zoe has 40 stickers.",
    "A train travels 60 miles per hour for 2 hours. How far does it go?",
    "7",
    "Sam walks 3 km to school and back every day. How far in a 5-day week?",
    "Mia bakes 24 cookies and eats 5.",
]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "norm" not in name:
                weight.mul_(10.0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in QUESTIONS
    ]
    yield model.eval(), tokenizer, prompts
    torch.set_num_threads(threads)


def gen(lm, scheduler: str, batch_size: int = 4):
    model, tokenizer, _ = lm
    return make_generator("hf", model=model, tokenizer=tokenizer, batch_size=batch_size, scheduler=scheduler)


def same(a, b) -> None:
    """The Completion contract, field by field; log-probs to float tolerance."""
    assert [(c.token_ids, c.text, c.finish_reason, c.eos, c.tokens) for c in a] == [
        (c.token_ids, c.text, c.finish_reason, c.eos, c.tokens) for c in b
    ]
    for x, y in zip(a, b):
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-4)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_greedy_identical_to_static(lm, batch_size):
    prompts = lm[2]
    # mixed max_new_tokens: rows end at different steps, so slots are refilled mid-batch
    samplings = [Sampling(max_new_tokens=4 + 3 * i) for i in range(len(prompts))]
    static = gen(lm, "static").generate(prompts, samplings)
    continuous = gen(lm, "continuous", batch_size).generate(prompts, samplings)
    same(continuous, static)
    assert len({tuple(c.token_ids) for c in static}) > 1  # the prompts really lead to different outputs


def test_stop_strings_and_eos_end_rows_where_static_does(lm):
    model, tokenizer, prompts = lm
    free = gen(lm, "static").generate(prompts, Sampling(max_new_tokens=24))
    # stop strings the model is bound to produce: printable pieces of two rows' greedy outputs
    stops = tuple(
        next(
            p
            for t in c.token_ids[3:]
            if (p := tokenizer.decode([t]).strip()) and p.isascii() and p.isprintable()
        )
        for c in free[:2]
    )
    eos = free[2].token_ids[5]  # and a token of a third row's output declared a second EOS
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [original, eos]
    try:
        s = Sampling(max_new_tokens=24, stop=stops)
        static = gen(lm, "static").generate(prompts, s)
        continuous = gen(lm, "continuous", 3).generate(prompts, s)
    finally:
        model.generation_config.eos_token_id = original
    same(continuous, static)
    reasons = {(c.finish_reason, c.eos) for c in continuous}
    assert {("stop", False), ("stop", True)} <= reasons  # both endings really happened
    for c in continuous:
        if c.finish_reason == "stop" and not c.eos:  # ended at the token completing a stop string
            text = tokenizer.decode(c.token_ids)
            assert any(x in text for x in stops) and not any(
                x in tokenizer.decode(c.token_ids[:-1]) for x in stops
            )


def test_first_token_eos_and_one_token(lm):
    model, _, prompts = lm
    first = gen(lm, "static").generate(prompts, Sampling(max_new_tokens=1))
    same(gen(lm, "continuous", 2).generate(prompts, Sampling(max_new_tokens=1)), first)
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [original, first[0].token_ids[0]]
    try:
        s = Sampling(max_new_tokens=8)
        same(gen(lm, "continuous", 2).generate(prompts, s), gen(lm, "static").generate(prompts, s))
    finally:
        model.generation_config.eos_token_id = original


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_are_the_tempered_policy_of_sampled_tokens(lm, temperature):
    model, tokenizer, prompts = lm
    s = Sampling(temperature=temperature, top_p=0.9, max_new_tokens=10)
    out = gen(lm, "continuous", 3).generate(prompts, s, seed=4)
    for prompt, c in zip(prompts, out):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + c.token_ids])).logits[0].float()
        positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(c.token_ids))
        tempered = (logits / (temperature or 1.0)).log_softmax(-1)[positions, torch.tensor(c.token_ids)]
        assert torch.allclose(torch.tensor(c.logprobs), tempered, atol=1e-4)
    assert gen(lm, "continuous", 3).generate(prompts, s, seed=4, logprobs=False)[0].logprobs == []


def test_sampling_reproducible_per_request(lm):
    prompts = lm[2]
    s = [Sampling(temperature=t, max_new_tokens=10) for t in (1.0, 0.5, 0.0) * 3]
    a = gen(lm, "continuous", 3).generate(prompts, s, seed=1)
    assert [c.token_ids for c in a] == [
        c.token_ids for c in gen(lm, "continuous", 3).generate(prompts, s, seed=1)
    ]
    # each request has its own random stream: another batch size gives the same samples
    same(gen(lm, "continuous", 5).generate(prompts, s, seed=1), a)
    assert [c.token_ids for c in gen(lm, "continuous", 3).generate(prompts, s, seed=2)] != [
        c.token_ids for c in a
    ]
    repeated = gen(lm, "continuous", 4).generate(
        [prompts[1]] * 4, Sampling(temperature=1.0, max_new_tokens=10)
    )
    assert len({tuple(c.token_ids) for c in repeated}) > 1


def test_progress_and_model_state(lm):
    model, tokenizer, prompts = lm
    progress: list[tuple[int, int]] = []
    state = torch.random.get_rng_state()
    model.train()
    try:
        out = gen(lm, "continuous", 2).generate(
            prompts,
            Sampling(temperature=1.0, max_new_tokens=6),
            on_progress=lambda n, t: progress.append((n, t)),
        )
        assert model.training and torch.equal(state, torch.random.get_rng_state())
    finally:
        model.eval()
    assert progress == sorted(progress) and progress[-1] == (len(prompts), sum(c.tokens for c in out))
    assert gen(lm, "continuous").generate([], Sampling()) == []


def test_unknown_scheduler(lm):
    with pytest.raises(LooperError, match="unknown --scheduler 'paged'"):
        gen(lm, "paged")


def test_scheduler_and_dtype_options():
    from looper.config import ConfigError, EvalConfig, RolloutsConfig, build_config

    assert RolloutsConfig().scheduler == EvalConfig().scheduler == "continuous"
    assert RolloutsConfig().batch_size is EvalConfig().batch_size is None  # unset: per scheduler and device
    with pytest.raises(ConfigError, match="--scheduler.*continuous, static"):
        build_config(RolloutsConfig, file_values={}, cli_values={"scheduler": "paged"})
    with pytest.raises(ConfigError, match="--dtype.*auto, float32, bfloat16"):
        build_config(EvalConfig, file_values={}, cli_values={"dtype": "fp8"})


def test_unset_batch_is_64_for_continuous_on_cpu_else_16(lm):
    from looper.generation import default_batch_size

    assert default_batch_size("continuous", torch.device("cpu")) == 64  # a CPU decode step is memory-bound
    assert default_batch_size("static", "cpu") == default_batch_size("continuous", "cuda") == 16
    model, tokenizer, _ = lm
    assert make_generator("hf", model=model, tokenizer=tokenizer, scheduler="continuous").batch_size == 64
    assert make_generator("hf", model=model, tokenizer=tokenizer, scheduler="static").batch_size == 16
    assert make_generator("hf", model=model, tokenizer=tokenizer, batch_size=5).batch_size == 5


def test_bfloat16_needs_native_support_and_is_recorded(monkeypatch):
    from looper.policy import models, policies

    monkeypatch.setattr(models, "has_cuda", lambda: False)
    policy = policies.Policy(
        name="base", source=models.resolve_model("looper:tiny"), adapter=None, artifact=None
    )
    assert policies.generation_weights("hf", policy)["dtype"] == "float32"
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)
    assert policies.generation_weights("hf", policy, sampling=True)["dtype"] == "float32"
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    # 'auto': rollouts (sampling) in bf16 on a CPU that computes it natively, eval in float32
    assert policies.generation_weights("hf", policy, sampling=True)["dtype"] == "bfloat16"
    assert (
        models.resolve_dtype("auto") == "float32"
        and models.resolve_dtype("float32", sampling=True) == "float32"
    )
    monkeypatch.setattr(models, "has_cuda", lambda: True)
    assert models.resolve_dtype("auto") == "bfloat16"
    monkeypatch.setattr(models, "has_cuda", lambda: False)
    # recorded, so that ppo recomputes behaviour log-probs with its float32 model (`--behaviour-logprobs auto`)
    assert policies.generation_weights("hf", policy, "bfloat16")["dtype"] == "bfloat16"
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)
    with pytest.raises(LooperError, match="--dtype bfloat16: this CPU has neither AVX-512 BF16 nor AMX"):
        models.resolve_dtype("bfloat16")
    # 'fast' (training): bf16 where native, float32 where bf16 would be slow or an error
    assert models.resolve_dtype("fast") == "float32"
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    assert models.resolve_dtype("fast") == "bfloat16"


def test_cpu_bf16_autocast_training_is_not_a_bf16_model(monkeypatch):
    """ppo's `auto` compares the training weights with the sampling ones: a CPU keeps float32 weights
    under bf16 autocast, so bf16-weight rollouts are recomputed; CUDA loads bf16 weights."""
    from looper.config import PpoConfig
    from looper.policy import models
    from looper.train import runner
    from looper.train.grpo_math import behaviour_logprobs_source

    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(models, "has_cuda", lambda: False)
    sampled = {"backend": "hf", "quant": "none", "dtype": "bfloat16", "adapter": "merged"}
    for dtype, weights, source in (
        ("fast", "float32+bf16-autocast", "recompute"),
        ("bfloat16", "float32+bf16-autocast", "recompute"),
        ("auto", "float32", "recompute"),
    ):
        trained = runner.training_weights_dtype(PpoConfig(dtype=dtype))
        assert trained == weights, dtype
        got = behaviour_logprobs_source("auto", sampled, {"backend": "hf", "quant": "none", "dtype": trained})
        assert got[0] == source and f"dtype bfloat16 vs {weights}" in got[1], got
    monkeypatch.setattr(models, "has_cuda", lambda: True)
    assert runner.training_weights_dtype(PpoConfig(dtype="fast")) == "bfloat16"


def test_bfloat16_generates_with_the_same_contract(lm):
    model, tokenizer, prompts = lm
    bf16 = type(model).from_pretrained(model.name_or_path, dtype=torch.bfloat16).eval()
    out = make_generator(
        "hf", model=bf16, tokenizer=tokenizer, batch_size=3, scheduler="continuous"
    ).generate(prompts, Sampling(temperature=0.5, max_new_tokens=6), seed=2)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    for c in out:
        assert 1 <= len(c.logprobs) == len(c.token_ids) <= 6 and all(lp <= 0 for lp in c.logprobs)
        assert c.finish_reason == ("length" if c.tokens == 6 else "stop")


def test_newcomers_prefilled_in_chunks_match_static(lm, monkeypatch):
    from looper.generation import continuous

    prompts = lm[2]
    samplings = [Sampling(max_new_tokens=3 + 2 * i) for i in range(len(prompts))]
    static = gen(lm, "static").generate(prompts, samplings)
    calls: list[int] = []
    prefill = continuous.ContinuousGenerator._prefill

    def counted(self, chunk, ids):
        calls.append(len(chunk))
        return prefill(self, chunk, ids)

    monkeypatch.setattr(continuous.ContinuousGenerator, "_prefill", counted)
    same(gen(lm, "continuous", 16).generate(prompts, samplings), static)
    assert calls == [len(prompts)]  # every slot free at the start: one padded prefill for all
    calls.clear()
    # a token budget below two prompts: one prompt per prefill
    monkeypatch.setattr(continuous, "PREFILL_TOKENS", 1)
    same(gen(lm, "continuous", 16).generate(prompts, samplings), static)
    assert calls == [1] * len(prompts)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.5, 1.0), (1.3, 0.7)])
def test_sampler_draws_the_warped_distribution(temperature, top_p):
    """The batched inverse-CDF sampler against transformers' own temperature and top-p warpers."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    from looper.generation.continuous import ContinuousGenerator, _Row

    logits = torch.tensor([[2.0, 1.5, 0.3, -1.0, 0.9, -3.0]])
    expected = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
    expected = expected.softmax(-1)[0]
    s = Sampling(temperature=temperature, top_p=top_p)
    rows = [_Row(k, s, torch.Generator().manual_seed(k)) for k in range(4000)]
    tokens = ContinuousGenerator._sample(logits.expand(len(rows), -1), rows)
    frequencies = torch.bincount(tokens, minlength=logits.shape[1]).float() / len(rows)
    assert torch.all(frequencies[expected == 0] == 0)  # top-p's cut tokens are never drawn
    assert torch.allclose(frequencies, expected, atol=0.025)  # > 3 standard errors at n = 4000
