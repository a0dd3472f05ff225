"""looper.generation: the hf backend on the tiny random model, and make_generator's errors.

A freshly initialised model is close to uniform, so its greedy output repeats one token and
its top tokens nearly tie. The fixture scales the weights up (norms excepted): outputs then
vary with the context and the argmax is well separated, so padding or ordering bugs show as
different tokens instead of hiding behind "\\n\\n\\n...".
"""

from __future__ import annotations

import sys

import pytest
import torch

from looper.errors import LooperError
from looper.generation import Completion, Generator, Sampling
from looper.generation.factory import make_generator

QUESTIONS = [
    "x",
    "What is 2+2?",
    "Ann has 5 apples and buys 3 more. How many apples does she have now?",
    "Tom reads 12 pages a day for 3 days, then 7 more pages. How many pages did he read in total?",
    "Zoe has 40 stickers.",
    "A train travels 60 miles per hour for 2 hours. How far does it go?",
    "7",
]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # One thread: a 64-wide model gains nothing from more, and on a busy 2-core box
    # spinning worker threads made runs 10x slower.
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


def hf(lm, batch_size: int = 4):
    model, tokenizer, _ = lm
    return make_generator("hf", model=model, tokenizer=tokenizer, batch_size=batch_size)


def test_generator_protocol_and_shapes(lm):
    gen = hf(lm)
    assert isinstance(gen, Generator)
    out = gen.generate(lm[2][:3], Sampling(max_new_tokens=5))
    assert len(out) == 3 and all(isinstance(c, Completion) for c in out)
    assert all(len(c.logprobs) == c.tokens == len(c.token_ids) for c in out)
    assert gen.generate([], Sampling()) == []


def test_order_preserved_across_lengths_and_samplings(lm):
    prompts = lm[2]
    kinds = [
        Sampling(max_new_tokens=6),
        Sampling(max_new_tokens=9),
        Sampling(temperature=0.7, max_new_tokens=7),
    ]
    samplings = [kinds[i % 3] for i in range(len(prompts))]
    progress: list[tuple[int, int]] = []
    out = hf(lm, batch_size=2).generate(prompts, samplings, on_progress=lambda n, t: progress.append((n, t)))
    single = hf(lm, batch_size=1)
    for prompt, s, c in zip(prompts, samplings, out):
        assert c.tokens <= s.max_new_tokens
        if s.temperature == 0:  # greedy: the same completion as generating this prompt alone
            alone = single.generate([prompt], s)[0]
            assert (c.token_ids, c.text) == (alone.token_ids, alone.text)
    # running totals after each batch: groups of 3, 2, 2 prompts at batch_size 2 -> 4 batches
    assert len(progress) == 4
    assert [n for n, _ in progress] == sorted(n for n, _ in progress)
    assert progress[-1] == (len(prompts), sum(c.tokens for c in out))


def test_batched_greedy_equals_unbatched(lm):
    s = Sampling(max_new_tokens=24)
    one = hf(lm, batch_size=1).generate(lm[2], s)
    four = hf(lm, batch_size=4).generate(lm[2], s)
    assert [c.token_ids for c in four] == [c.token_ids for c in one]
    assert [c.text for c in four] == [c.text for c in one]
    assert len({tuple(c.token_ids) for c in one}) > 1  # the prompts really lead to different outputs
    for a, b in zip(one, four):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


@pytest.mark.parametrize(
    "sampling", [Sampling(temperature=0.3, top_p=0.9, max_new_tokens=12), Sampling(max_new_tokens=12)]
)
def test_logprobs_are_the_tempered_policy_sampled_from(lm, sampling):
    """log_softmax(logits / T) of each sampled token (T = 1 for greedy), before top-p: what ppo trains."""
    model, tokenizer, prompts = lm
    out = hf(lm, batch_size=3).generate(prompts, sampling, seed=3)
    temperature = sampling.temperature or 1.0
    for prompt, c in zip(prompts, out):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + c.token_ids])).logits[0].float()
        positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(c.token_ids))
        targets = torch.tensor(c.token_ids)
        tempered = (logits / temperature).log_softmax(-1)[positions, targets]
        assert torch.allclose(torch.tensor(c.logprobs), tempered, atol=1e-4)
        if sampling.temperature:  # and not the untempered ones (schema 3 and before)
            raw = logits.log_softmax(-1)[positions, targets]
            assert not torch.allclose(torch.tensor(c.logprobs), raw, atol=1e-2)


def test_same_seed_same_samples_different_seed_different(lm):
    gen, s = hf(lm), Sampling(temperature=1.0, max_new_tokens=10)
    a = gen.generate(lm[2], s, seed=1)
    b = gen.generate(lm[2], s, seed=1)
    c = gen.generate(lm[2], s, seed=2)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.logprobs for x in a] == [x.logprobs for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_repeated_prompt_gets_different_samples(lm):
    out = hf(lm).generate([lm[2][1]] * 4, Sampling(temperature=1.0, max_new_tokens=10))
    assert len({tuple(c.token_ids) for c in out}) > 1


def test_max_new_tokens_gives_length(lm):
    out = hf(lm).generate(lm[2], Sampling(max_new_tokens=5))
    assert all(c.tokens == 5 and c.finish_reason == "length" for c in out)


def test_stop_string_cuts_text_and_tokens(lm):
    _, tokenizer, prompts = lm
    free = hf(lm).generate(prompts[:1], Sampling(max_new_tokens=24))[0]
    # A stop string the model is bound to produce: a printable piece of its own greedy output.
    stop = next(
        piece
        for t in free.token_ids[3:]
        if (piece := tokenizer.decode([t]).strip()) and piece.isascii() and piece.isprintable()
    )
    cut = free.text.index(stop)
    for batch_size in (1, 4):  # alone, and in a batch where other rows go on generating
        c = hf(lm, batch_size).generate(prompts[:4], Sampling(max_new_tokens=24, stop=(stop,)))[0]
        assert (c.text, c.finish_reason) == (free.text[:cut], "stop")
        # tokens: a prefix of the free run, up to and including the one that completed `stop`
        assert c.token_ids == free.token_ids[: c.tokens]
        assert c.logprobs == pytest.approx(free.logprobs[: c.tokens], abs=1e-4)
        assert stop in tokenizer.decode(c.token_ids) and stop not in tokenizer.decode(c.token_ids[:-1])


def test_eos_ends_completion_and_is_stored(lm):
    model, tokenizer, prompts = lm
    s = Sampling(max_new_tokens=16)
    free = hf(lm).generate(prompts, s)
    # Declare a token that the first prompt's greedy run emits to be a second EOS (the
    # generation config may list several): completions must end with its first use, kept
    # with its log-prob (so RL trains stopping), and not counted in `tokens`.
    eos = free[0].token_ids[4]
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [original, eos]
    try:
        out = hf(lm).generate(prompts, s)
    finally:
        model.generation_config.eos_token_id = original
    for f, c in zip(free, out):
        if eos in f.token_ids:
            n = f.token_ids.index(eos)
            assert (c.token_ids, c.finish_reason, c.eos, c.tokens) == (f.token_ids[: n + 1], "stop", True, n)
            assert c.logprobs == pytest.approx(f.logprobs[: n + 1], abs=1e-4)
            assert c.text == tokenizer.decode(f.token_ids[:n], skip_special_tokens=True)
        else:
            assert (c.token_ids, c.finish_reason, c.eos) == (f.token_ids, "length", False)
    assert out[0].tokens <= 4


def test_first_token_eos_is_one_stored_token(lm):
    model, _, prompts = lm
    first = hf(lm).generate(prompts[:1], Sampling(max_new_tokens=8))[0]
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [original, first.token_ids[0]]
    try:
        c = hf(lm).generate(prompts[:1], Sampling(max_new_tokens=8))[0]
    finally:
        model.generation_config.eos_token_id = original
    assert (c.token_ids, c.tokens, c.text, c.finish_reason) == ([first.token_ids[0]], 0, "", "stop")
    assert c.logprobs == pytest.approx(first.logprobs[:1], abs=1e-4)


def test_leaves_model_mode_rng_and_tokenizer_alone(lm):
    model, tokenizer, prompts = lm
    side = tokenizer.padding_side
    model.train()
    state = torch.random.get_rng_state()
    try:
        hf(lm).generate(prompts[:2], Sampling(temperature=1.0, max_new_tokens=3), seed=5)
        assert model.training
        assert torch.equal(state, torch.random.get_rng_state())
        assert tokenizer.padding_side == side
    finally:
        model.eval()


def test_sampling_validation():
    assert Sampling(stop=["a", "b"]).stop == ("a", "b")
    assert Sampling(stop="####").stop == ("####",)
    assert hash(Sampling(stop=["x"])) == hash(Sampling(stop=("x",)))
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_new_tokens": 0}):
        with pytest.raises(LooperError):
            Sampling(**bad)


def test_mismatched_sampling_list(lm):
    with pytest.raises(ValueError):
        hf(lm).generate(lm[2][:2], [Sampling()])


def test_vllm_backend_without_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail even where installed
    with pytest.raises(LooperError, match=r"pip install 'looper\[vllm\]' \(GPU only\), or use --backend hf"):
        make_generator("vllm", model_path="some/model")


def test_unknown_backend():
    with pytest.raises(LooperError, match="unknown generation backend 'tgi'"):
        make_generator("tgi")


def old_output_logits_batch(gen, rows: list[list[int]], s: Sampling) -> tuple[list, list]:
    """The hf backend as it was: `output_logits=True` (all B x T x V raw logits kept), then per step
    gather - logsumexp. Returns (generated ids, log-probs) per row, un-cut."""
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), gen.pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for r, row in enumerate(rows):
        input_ids[r, width - len(row) :], mask[r, width - len(row) :] = torch.tensor(row), 1
    options = {"do_sample": False}
    if s.temperature > 0:
        options = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": 0}
    result = gen.model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=s.max_new_tokens,
        eos_token_id=gen.eos_ids,
        pad_token_id=gen.eos_ids[0],
        repetition_penalty=1.0,
        output_logits=True,
        return_dict_in_generate=True,
        **options,
    )
    out = result.sequences[:, width:]
    temperature = s.temperature or 1.0  # stored log-probs are tempered (rollouts schema 4)
    logprobs = torch.stack(
        [
            (step.float() / temperature).gather(1, out[:, t, None]).squeeze(1)
            - (step.float() / temperature).logsumexp(-1)
            for t, step in enumerate(result.logits)
        ],
        dim=1,
    )
    return out.tolist(), logprobs.tolist()


@pytest.mark.parametrize(
    "sampling",
    [Sampling(temperature=0.7, top_p=0.9, max_new_tokens=16), Sampling(max_new_tokens=16)],
)
def test_step_by_step_logprobs_equal_the_output_logits_ones(lm, sampling):
    """The LogitsProcessor recorder gives the same tokens and log-probs (float tolerance) as keeping
    every step's raw logits and tempering them did, at a temperature and top-p that change the
    sampler's scores."""
    model, tokenizer, prompts = lm
    gen = hf(lm, batch_size=8)
    rows = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        torch.manual_seed(11)
        old_ids, old_logprobs = old_output_logits_batch(gen, rows, sampling)
        torch.manual_seed(11)
        new = gen._batch(rows, sampling)
    for ids, logprobs, c in zip(old_ids, old_logprobs, new):
        n = len(c.token_ids)
        assert c.token_ids == ids[:n]
        assert c.logprobs == pytest.approx(logprobs[:n], abs=1e-5)


def test_logprobs_false_same_completions_no_logprobs(lm):
    s = Sampling(temperature=0.8, max_new_tokens=12)
    with_lp = hf(lm).generate(lm[2], s, seed=5)
    without = hf(lm).generate(lm[2], s, seed=5, logprobs=False)
    assert [c.token_ids for c in without] == [c.token_ids for c in with_lp]
    assert [c.text for c in without] == [c.text for c in with_lp]
    assert all(c.logprobs == [] for c in without) and all(c.logprobs for c in with_lp)
