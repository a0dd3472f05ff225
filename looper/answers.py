"""The one answer checker every Looper stage uses (SFT filtering, rollout rewards, eval).

``extract_answer`` finds the final answer in a completion with the first rule below that
matches; within a rule the LAST occurrence wins, because models restate and correct themselves.

0. If the text contains ``</think>``, the part after the last ``</think>`` is searched first and
   the whole text only if nothing is found there (an unterminated ``<think>`` means the model was
   cut off mid-thought, so the whole text is searched).
1. The GSM8K marker ``#### 18``; only when a number follows, so markdown headings such as
   ``#### Step 2`` or ``#### 3. Compute the total`` are not taken for answers.
2. ``\\boxed{...}`` / ``\\fbox{...}`` with balanced braces (``\\boxed{\\frac{3}{4}}``).
3. ``<answer>...</answer>`` tags.
4. The phrases "The (final) answer is X" and "Answer: X" (any case, X may be bold or have ``$``).
5. The last number in the text.

Numbers come back in one exact canonical form (via ``fractions.Fraction``): "18", "0.75", "1/3",
so "$18.00", "18 eggs", "1,000", "50%" and ``\\frac{3}{4}`` compare by string equality. Content that
is not a number (``\\boxed{x+1}``) comes back as its stripped text and is compared with math-verify.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from fractions import Fraction

import sympy
from math_verify import parse, verify

# math-verify runs without its signal-based timeout (signals break outside the main thread),
# so only short inputs with no astronomically large sub-expressions are handed to sympy.
_MAX_SYMPY_CHARS = 200
_MAX_SYMPY_MAGNITUDE = 1e15

_LATEX_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
# \frac with plain numeric arguments only; anything richer (or "3\frac{1}{2}") goes to sympy.
_LATEX_FRAC = re.compile(r"(?<![0-9])\\[dt]?frac\s*\{\s*([0-9.]+)\s*\}\s*\{\s*([0-9]+)\s*\}")
# Currency, percent, bold, LaTeX spacing (\! \, also serve as thousands separators) and \( \).
_NOISE = re.compile(r"\\[$%!,; ()\[\]]|\{,\}|[$%]|\*\*")
_THOUSANDS = re.compile(r"(?<=[0-9]),(?=[0-9]{3}(?![0-9]))")
_NUMBER = re.compile(r"([+-]?)\s*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?:\s*/\s*([0-9]+))?(?P<tail>.*)", re.S)
# What may follow a number: units and words ("eggs", "km/h", "."), but no digits or operators.
_UNIT_TAIL = re.compile(r"[^0-9=+*^\\]*")

_GSM8K_MARKER = re.compile(r"####[ \t]*([^\n]*)")
_NUMBERED_HEADING = re.compile(r"[0-9]+[.)]\s+[^\W\d]")  # "#### 3. Compute the total"
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_TAG = re.compile(r"<answer>((?:(?!</?answer>).)*)</answer>", re.S | re.I)
# The value is captured inside a lookahead so that a second phrase on the same line still matches.
_ANSWER_PHRASE = re.compile(r"\banswer(?:\*\*)?\s*(?:is\b|:)(?=[\s:*]*([^\n]{0,200}))", re.I)
# A number standing on its own: not part of a word ("3rd", "x2") or of a longer decimal.
_LONE_NUMBER = r"(?<![\w.])-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?(?![.,]?\w)"
_LAST_NUMBER = re.compile(_LONE_NUMBER)
_LEADING_NUMBER = re.compile(r"[\\$\s]*(" + _LONE_NUMBER + r"(?:/[0-9]+)?)")


def normalize_number(s: str) -> str | None:
    """Canonical exact form of a numeric answer ("$1,000.50" -> "1000.5"), or None if not a number."""
    try:
        value = _hand_number(s)
        if value is None:
            value = _sympy_number(s)
        return None if value is None else _format(value)
    except Exception:  # noqa: BLE001 - reward code must never crash on model output
        return None


def extract_answer(text: str) -> str | None:
    """The final answer in a completion (canonical number or stripped text), or None. Never raises."""
    try:
        if not isinstance(text, str):
            return None
        if "</think>" in text:
            found = _search(text.rpartition("</think>")[2])
            if found is not None:
                return found
        return _search(text)
    except Exception:  # noqa: BLE001
        return None


def is_correct(completion: str, gold: str) -> bool:
    """True iff the answer extracted from ``completion`` equals ``gold`` exactly. Never raises."""
    try:
        predicted = extract_answer(completion)
        return predicted is not None and gold is not None and _equivalent(predicted, str(gold))
    except Exception:  # noqa: BLE001
        return False


def answers_agree(a: str | None, b: str | None) -> bool:
    """True iff two extracted answers are both present and equal. Never raises."""
    try:
        return a is not None and b is not None and _equivalent(a, b)
    except Exception:  # noqa: BLE001
        return False


def _equivalent(a: str, b: str) -> bool:
    number_a, number_b = normalize_number(a), normalize_number(b)
    if number_a is not None or number_b is not None:
        return number_a == number_b
    if a.strip() == b.strip():
        return True
    expr_a, expr_b = _parse_latex(a), _parse_latex(b)
    return expr_a is not None and expr_b is not None and verify(expr_a, expr_b, timeout_seconds=None)


# --- numbers -------------------------------------------------------------------------------


def _hand_number(s: str) -> Fraction | None:
    """The cheap, common cases: plain numbers with currency, units, commas, %, simple \\frac."""
    s = _LATEX_WRAPPER.sub(r"\1", s)
    s = _LATEX_FRAC.sub(r"\1/\2", s)
    s = _NOISE.sub("", s).replace("\u2212", "-")  # U+2212 is the typographic minus sign
    s = _THOUSANDS.sub("", s).strip()
    match = _NUMBER.fullmatch(s)
    if match is None or not _UNIT_TAIL.fullmatch(match["tail"]) or match[3] == "0":
        return None
    value = Fraction(match[2]) / int(match[3] or 1)
    return -value if match[1] == "-" else value


def _sympy_number(s: str) -> Fraction | None:
    """Exact value of LaTeX the hand parser cannot read (\\sqrt{4}, 2^{10}, x = 18) via math-verify."""
    expr = _parse_latex(s)
    if isinstance(expr, sympy.Eq):  # "\boxed{x = 18}": the value is the right-hand side
        expr = expr.rhs
    if not isinstance(expr, sympy.Expr) or not expr.is_number:
        return None
    exact = sympy.simplify(expr)
    if exact.is_Rational:
        return Fraction(int(exact.p), int(exact.q))
    if exact.is_Float:  # decimals inside an expression, e.g. 2.5 \cdot 4
        return Fraction(str(exact))
    return None  # irrational (\pi, \sqrt{2}) or complex


def _parse_latex(s: str) -> sympy.Basic | None:
    s = s.strip().strip("$")
    if not s or len(s) > _MAX_SYMPY_CHARS:
        return None
    parsed = parse(f"${s}$", parsing_timeout=None)
    expr = parsed[0] if parsed else None
    return expr if isinstance(expr, sympy.Basic) and _is_tame(expr) else None


def _is_tame(expr: sympy.Basic) -> bool:
    """No unbounded or huge numeric part: simplify/verify would expand 9^{9^9} exactly and hang."""
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, (sympy.Sum, sympy.Product, sympy.Integral)):
            return False
        if getattr(node, "is_number", False) and not node.is_Atom:
            approx = node.evalf(15)
            if not (approx.is_finite and abs(approx) < _MAX_SYMPY_MAGNITUDE):
                return False
    return True


def _format(value: Fraction) -> str:
    """Integer -> "18", terminating decimal -> shortest "2.25", otherwise "a/b"."""
    if value.denominator == 1:
        return str(value.numerator)
    rest = value.denominator
    for prime in (2, 5):
        while rest % prime == 0:
            rest //= prime
    if rest != 1:
        return f"{value.numerator}/{value.denominator}"
    places = 0
    while 10**places % value.denominator:
        places += 1
    scaled = abs(value.numerator) * 10**places // value.denominator
    digits = f"{scaled // 10**places}.{scaled % 10**places:0{places}d}".rstrip("0")
    return f"-{digits}" if value < 0 else digits


# --- extraction rules ----------------------------------------------------------------------


def _search(text: str) -> str | None:
    for rule in (_gsm8k_marker, _boxed, _answer_tag, _answer_phrase, _last_number):
        found = rule(text)
        if found is not None:
            return found
    return None


def _last(contents: Iterable[str]) -> str | None:
    """Canonical form of the last non-empty content: a number if it is one, else the text."""
    for content in reversed(list(contents)):
        content = content.strip()
        if content:
            return normalize_number(content) or content
    return None


def _gsm8k_marker(text: str) -> str | None:
    contents = (m[1] for m in _GSM8K_MARKER.finditer(text))
    numbers = (normalize_number(c) for c in contents if not _NUMBERED_HEADING.match(c))
    return _last(n for n in numbers if n is not None)


def _boxed(text: str) -> str | None:
    # One pass pairing every brace keeps this linear on junk like a million unclosed "\boxed{".
    closing: dict[int, int] = {}
    open_braces: list[int] = []
    for brace in re.finditer(r"(?<!\\)[{}]", text):
        if brace[0] == "{":
            open_braces.append(brace.start())
        elif open_braces:
            closing[open_braces.pop()] = brace.start()
    starts = (m.end() - 1 for m in _BOXED.finditer(text))
    return _last(text[start + 1 : closing[start]] for start in starts if start in closing)


def _answer_tag(text: str) -> str | None:
    return _last(m[1] for m in _ANSWER_TAG.finditer(text))


def _answer_phrase(text: str) -> str | None:
    return _last(_phrase_value(m[1]) for m in _ANSWER_PHRASE.finditer(text))


def _phrase_value(rest_of_line: str) -> str:
    """The number right after the phrase ("18 because 5 + 13 = 18" gives 18), else the sentence."""
    leading = _LEADING_NUMBER.match(rest_of_line)
    if leading:
        return leading[1]
    return re.split(r"\.(?:\s|$)", rest_of_line, maxsplit=1)[0].replace("**", "")


def _last_number(text: str) -> str | None:
    matches = list(_LAST_NUMBER.finditer(text))
    return normalize_number(matches[-1][0]) if matches else None
