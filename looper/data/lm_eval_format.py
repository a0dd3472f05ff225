"""lm-evaluation-harness' `gsm8k` task, as data: `looper eval --format lm-eval` reproduces it.

The harness task (lm_eval/tasks/gsm8k/gsm8k.yaml, metadata version 3) in short:

* 5-shot, plain text, no chat template: for each test question, 5 train rows drawn by the
  harness's default sampler (the task has no `fewshot_config`): one `random.Random(1234)`,
  `rnd.sample(train_docs, 5)` per question in document order, over the train split in file
  order. Each is rendered `Question: {question}\\nAnswer: {answer}`
  with the full GSM8K answer (worked steps, `<<48/2=24>>` calculator annotations and `#### n`),
  joined by a blank line, then `Question: {question}\\nAnswer:` for the question asked;
* greedy decoding until `Question:`, `</s>`, `<|im_end|>` (or the tokenizer's EOS);
* two answer filters: "strict-match" takes the first `#### <number>`, "flexible-extract"
  takes the last number-like run anywhere; each falls back to "[invalid]";
* `exact_match` of the filtered answer against the gold answer after deleting `,`, `$`,
  everything up to `#### ` and a final `.`, case folded.

Where `looper eval --format lm-eval` differs, on purpose or by necessity:

* the few-shot answers are the raw GSM8K answers when the prepare artifact's source can be
  re-read (a local file or directory; the hub via the `datasets` cache); otherwise the
  prepare rows' `solution`, whose `<<...>>` annotations were stripped at prepare time. The
  manifest says which (`prompt.fewshot_answers`);
* the reference is the prepare row's normalised gold answer, not the raw `#### n` text: on
  all 8,792 GSM8K train+test answers both give the same string after the harness's
  normalisation, so the scores are the same;
* the harness generates at most 256 tokens (`max_gen_toks`); pass `--max-new-tokens 256`
  to match it exactly (looper's default is 512);
* the pool is the prepare artifact's train + dev rows in source order: the harness's when
  prepare read the whole GSM8K train file (no --limit, no skipped rows); when evaluating
  the dev split, the questions being evaluated are left out of the pool.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

TASK = "gsm8k"
TASK_VERSION = 3.0
NUM_FEWSHOT = 5
FEWSHOT_SPLIT = "train"
FEWSHOT_SAMPLER = "default"  # random.Random(FEWSHOT_SEED).sample(train, 5), drawn per question in order
FEWSHOT_SEED = 1234  # the harness's default fewshot_random_seed
DOC_TO_TEXT = "Question: {question}\nAnswer:"
DOC_TO_TARGET = "{answer}"  # the full GSM8K answer, annotations and `#### n` included
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
UNTIL = ("Question:", "</s>", "<|im_end|>")
MAX_GEN_TOKS = 256  # the harness default for generate_until tasks

FALLBACK = "[invalid]"
STRICT_REGEX = r"#### (\-?[0-9\.\,]+)"
STRICT_GROUP_SELECT = 0  # then take_first: the first match
FLEXIBLE_REGEX = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
FLEXIBLE_GROUP_SELECT = -1  # the last match
IGNORE_CASE = True
IGNORE_PUNCTUATION = False
REGEXES_TO_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")

_STRICT = re.compile(STRICT_REGEX)
_FLEXIBLE = re.compile(FLEXIBLE_REGEX)

# Everything above in one dict, for the eval manifest.
CONVENTIONS: dict[str, Any] = {
    "task": TASK,
    "task_version": TASK_VERSION,
    "num_fewshot": NUM_FEWSHOT,
    "fewshot_split": FEWSHOT_SPLIT,
    "fewshot_sampler": FEWSHOT_SAMPLER,
    "doc_to_text": DOC_TO_TEXT,
    "doc_to_target": DOC_TO_TARGET,
    "target_delimiter": TARGET_DELIMITER,
    "fewshot_delimiter": FEWSHOT_DELIMITER,
    "until": list(UNTIL),
    "filters": {
        "strict-match": {"regex": STRICT_REGEX, "group_select": STRICT_GROUP_SELECT, "fallback": FALLBACK},
        "flexible-extract": {
            "regex": FLEXIBLE_REGEX,
            "group_select": FLEXIBLE_GROUP_SELECT,
            "fallback": FALLBACK,
        },
    },
    "exact_match": {
        "ignore_case": IGNORE_CASE,
        "ignore_punctuation": IGNORE_PUNCTUATION,
        "regexes_to_ignore": list(REGEXES_TO_IGNORE),
    },
}


def doc_to_text(question: str) -> str:
    return DOC_TO_TEXT.format(question=question)


def build_prompt(fewshot_rows: Sequence[dict], question: str) -> str:
    """The harness's context: `Question: q1\\nAnswer: a1\\n\\n...Question: q\\nAnswer:`.

    `fewshot_rows` are dicts with "question" and "answer" (the target text), in order.
    """
    shots = [
        doc_to_text(r["question"]) + TARGET_DELIMITER + DOC_TO_TARGET.format(answer=r["answer"])
        for r in fewshot_rows
    ]
    return FEWSHOT_DELIMITER.join([*shots, doc_to_text(question)])


def _regex_filter(pattern: re.Pattern, text: str, group_select: int) -> str:
    """The harness's `regex` filter: findall, pick one match, first non-empty group, strip."""
    matches = pattern.findall(text)
    if not matches:
        return FALLBACK
    match = matches[group_select]
    if isinstance(match, tuple):
        match = [g for g in match if g][0]
    return match.strip()


def strict_extract(completion: str) -> str:
    """ "strict-match": the number after the first `#### `, or "[invalid]"."""
    return _regex_filter(_STRICT, completion, STRICT_GROUP_SELECT)


def flexible_extract(completion: str) -> str:
    """ "flexible-extract": the last number-like run (`$1,000.`, `42`), or "[invalid]"."""
    return _regex_filter(_FLEXIBLE, completion, FLEXIBLE_GROUP_SELECT)


def normalize(text: str) -> str:
    """`exact_match`'s preprocessing of both prediction and reference."""
    for pattern in REGEXES_TO_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower() if IGNORE_CASE else text


def exact_match(prediction: str | None, reference: str) -> bool:
    """The harness's exact_match for one prediction (None counts as "[invalid]")."""
    return normalize(FALLBACK if prediction is None else prediction) == normalize(reference)
