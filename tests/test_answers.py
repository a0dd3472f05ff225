"""Tests for looper.answers: canonical numbers, extraction order, <think> handling, robustness."""

from __future__ import annotations

import random
import threading

import pytest

from looper.answers import answers_agree, extract_answer, is_correct, normalize_number


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("18", "18"),
        ("  18  ", "18"),
        ("18.00", "18"),
        ("$18", "18"),
        ("$18.00", "18"),
        ("\\$18", "18"),
        ("18 eggs", "18"),
        ("18 dollars per hour.", "18"),
        ("18.", "18"),
        ("**18**", "18"),
        ("1,000", "1000"),
        ("1,234,567.5", "1234567.5"),
        ("1{,}000", "1000"),
        ("1\\!000", "1000"),
        ("50%", "50"),
        ("50\\%", "50"),
        ("-7", "-7"),
        ("\u22127", "-7"),  # typographic minus
        ("-$5", "-5"),
        ("0.5", "0.5"),
        (".5", "0.5"),
        ("2.250", "2.25"),
        ("1/2", "0.5"),
        ("3/4", "0.75"),
        ("1/3", "1/3"),
        ("-2/6", "-1/3"),
        ("4/2", "2"),
        ("\\frac{3}{4}", "0.75"),
        ("\\dfrac{1}{2}", "0.5"),
        ("\\tfrac{1}{8}", "0.125"),
        ("-\\frac{1}{3}", "-1/3"),
        ("\\text{18 eggs}", "18"),
        ("18\\text{ eggs}", "18"),
        ("$\\frac{1}{2}$", "0.5"),
        # beyond the hand parser: math-verify / sympy
        ("\\sqrt{4}", "2"),
        ("2^{10}", "1024"),
        ("\\frac{1+2}{4}", "0.75"),
        ("x = 18", "18"),
    ],
)
def test_normalize_number(raw: str, canonical: str) -> None:
    assert normalize_number(raw) == canonical


@pytest.mark.parametrize(
    "raw", ["", "   ", "eggs", "x+1", "\\pi", "\\sqrt{2}", "1/0", "1, 2", "abc123", "9^{9^{9}}"]
)
def test_normalize_number_rejects_non_numbers(raw: str) -> None:
    assert normalize_number(raw) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # each rule on its own
        ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
        ("#### 1,000", "1000"),
        ("#### $18.00", "18"),
        ("So she has \\boxed{18} eggs.", "18"),
        ("\\boxed{\\frac{3}{4}}", "0.75"),
        ("\\fbox{12}", "12"),
        ("\\boxed{x+1}", "x+1"),
        ("<answer>42</answer>", "42"),
        ("<answer> 3.50 </answer>", "3.5"),
        ("The answer is 18.", "18"),
        ("the final answer is **18**", "18"),
        ("Answer: $18", "18"),
        ("**Answer:** 1,250", "1250"),
        ("The answer is 18 because 5 + 13 = 18 and 3", "18"),
        ("The answer is $\\frac{1}{2}$.", "0.5"),
        ("The answer is x + 1. Done 7", "x + 1"),
        ("She pays 5 + 7 = 12 dollars in total.", "12"),
        ("The temperature fell to -4 degrees.", "-4"),
        ("It costs 2.5 dollars.", "2.5"),
        ("They raised 12,500 dollars.", "12500"),
        ("He finished 3rd", None),  # an ordinal is not a number
        # the last occurrence within a rule wins
        ("#### 5\n#### 6", "6"),
        ("\\boxed{1} wait, no: \\boxed{2}", "2"),
        ("<answer>1</answer><answer>2</answer>", "2"),
        ("The answer is 3. Actually the answer is 4.", "4"),
        # the order between rules
        ("#### 5\nThen I counted 7 more.", "5"),
        ("\\boxed{9} ... #### 5", "5"),
        ("\\boxed{3} and later 7 apples", "3"),
        ("<answer>8</answer> \\boxed{3}", "3"),
        ("The answer is 6. <answer>8</answer>", "8"),
        ("Answer: 6, checked with 2 + 4 = 7", "6"),
        # a markdown heading is not the GSM8K marker
        ("#### Step 1\nWe get 12 apples.", "12"),
        ("#### 3. Compute the total\nWe get 12 apples.", "12"),
        # empty boxes fall through to the next rule
        ("\\boxed{} so 4", "4"),
        # no answer at all
        ("", None),
        ("I do not know.", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>Maybe 5? Or 6.</think>The total is \\boxed{7}.", "7"),
        ("<think>so #### 3</think>Therefore \\boxed{4}", "4"),
        ("<think>2 + 2 = 4</think>The answer is 4.", "4"),
        # nothing after </think>: fall back to the whole text
        ("<think>The answer is 9.</think>", "9"),
        ("<think>first 1</think><think>then \\boxed{2}</think> done", "2"),
        # unterminated <think>: the model was cut off, search everything
        ("<think>First 3 apples, then 8 apples", "8"),
        ("<think>So \\boxed{5} hmm, 6", "5"),
    ],
)
def test_extract_answer_think(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        ("#### 18", "18"),
        ("\\boxed{18.00}", "18"),
        ("The answer is $18.", "18"),
        ("She collects 18 eggs.", "18"),
        ("#### 1,000", "1000"),
        ("\\boxed{1000}", "1,000"),
        ("\\boxed{1/2}", "0.5"),
        ("\\boxed{\\frac{3}{4}}", "0.75"),
        ("\\boxed{\\dfrac{3}{4}}", "3/4"),
        ("The answer is 50%", "50"),
        ("\\boxed{-3}", "-3"),
        ("\\boxed{\\sqrt{4}}", "2"),
        ("\\boxed{x+1}", "1+x"),  # both non-numeric: math-verify decides
        ("<think>8?</think>\\boxed{9}", "9"),
    ],
)
def test_is_correct(completion: str, gold: str) -> None:
    assert is_correct(completion, gold) is True


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        ("#### 17", "18"),
        ("\\boxed{18.5}", "18"),
        ("\\boxed{-18}", "18"),
        ("\\boxed{1/3}", "0.33"),
        ("I do not know.", "18"),
        ("", "18"),
        (None, "18"),
        ("#### 18", None),
        ("\\boxed{x+1}", "18"),
        ("\\boxed{x+1}", "x+2"),
        ("<think>#### 18</think>\\boxed{17}", "18"),
    ],
)
def test_is_correct_false(completion: str, gold: str) -> None:
    assert is_correct(completion, gold) is False  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("a", "b", "agree"),
    [
        ("18", "18", True),
        ("18", "18.00", True),
        ("0.5", "1/2", True),
        ("1000", "1,000", True),
        ("18", "17", False),
        ("18", None, False),
        (None, None, False),
        ("x+1", "x+1", True),
        ("x+1", "18", False),
    ],
)
def test_answers_agree(a: str | None, b: str | None, agree: bool) -> None:
    assert answers_agree(a, b) is agree


def _garbage() -> list[object]:
    rng = random.Random(0)
    junk = ["".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(300)) for _ in range(20)]
    return junk + [
        "",
        "####",
        "#### ",
        "\\boxed{",
        "\\boxed{{{{}",
        "}}}\\boxed}{",
        "<answer>",
        "</think>",
        "<think>",
        "The answer is",
        "Answer:",
        "\x00\xff\ufffd" * 50,
        "\\boxed{" * 50_000,
        "1" * 5_000,  # more digits than int() accepts by default
        "\\boxed{" + "1" * 5_000 + "}",
        "9" * 200 + " apples " + "\\boxed{\\frac{1}{0}}",
        "\\boxed{9^{9^{9}} - 8^{9^{9}}}",
        "word " * 200_000 + "42",
        None,
        b"#### 18",
        18,
    ]


def test_never_raises_on_garbage() -> None:
    for text in _garbage():
        result = extract_answer(text)  # type: ignore[arg-type]
        assert result is None or isinstance(result, str)
        assert isinstance(is_correct(text, "18"), bool)  # type: ignore[arg-type]
        assert isinstance(answers_agree(result, "18"), bool)
        if isinstance(text, str):
            assert normalize_number(text[:1000]) is None or isinstance(normalize_number(text[:1000]), str)


def test_garbage_values() -> None:
    # The junk above must not be mistaken for answers where none exists.
    assert extract_answer("####") is None
    assert extract_answer("\\boxed{") is None
    assert extract_answer("\\boxed{" * 50_000) is None
    assert extract_answer("word " * 200_000 + "42") == "42"
    assert extract_answer(None) is None  # type: ignore[arg-type]


def test_works_outside_main_thread() -> None:
    # math-verify's default timeout uses signals, which fail in worker threads.
    results: list[bool] = []
    worker = threading.Thread(target=lambda: results.append(is_correct("\\boxed{\\sqrt{4}}", "2")))
    worker.start()
    worker.join(timeout=30)
    assert results == [True]
