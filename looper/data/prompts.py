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


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The exact text generation starts from: the chat template with the assistant turn opened.

    Training, rollouts and evaluation all build prompts here, so the model is trained on
    the same prefix it later generates from.
    """
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def opens_thinking(prompt_text: str) -> bool:
    """Whether the template pre-fills a `<think>` block (the DeepSeek-R1 distills do)."""
    return prompt_text.rstrip(" ").endswith(("<think>\n", "<think>"))


def sft_completion(solution: str, prompt_text: str) -> str:
    """The assistant text SFT trains on, continuing exactly where generation starts.

    We append the completion to the rendered prompt ourselves instead of rendering an
    assistant turn with the chat template, because reasoning templates rewrite that turn:
    the R1-distill template deletes everything up to `</think>` from assistant messages,
    so a conversational SFT example would silently lose the worked solution. When the
    prompt opens a think block, the worked steps go inside it and the `#### n` line after.
    """
    if not opens_thinking(prompt_text):
        return solution
    steps, _, final = solution.rpartition("####")
    return (
        f"{steps.strip()}\n</think>\n\n#### {final.strip()}"
        if steps.strip()
        else f"</think>\n\n#### {final.strip()}"
    )
