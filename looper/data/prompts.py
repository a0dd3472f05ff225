"""The tutoring prompt every stage shares (training, rollouts and evaluation).

All instructions sit in the user turn, with no system prompt: the DeepSeek-R1 distills
are documented to work best that way, and small instruct models follow it too.
The answer line `#### <number>` is GSM8K's own convention and what `looper.answers`
looks for first.
"""

from __future__ import annotations

INSTRUCTION = (
    "You are a patient math tutor. Solve the problem step by step, explaining each step "
    "briefly. End with a final line of the form '#### <answer>', where <answer> is just the number."
)


def tutoring_messages(question: str, instruction: str = INSTRUCTION) -> list[dict[str, str]]:
    """The chat messages asking for a step-by-step solution of `question`."""
    return [{"role": "user", "content": f"{instruction}\n\nProblem: {question.strip()}"}]
