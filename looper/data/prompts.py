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


def prompt_token_ids(tokenizer, prompt_text: str) -> list[int]:
    """The token ids of a rendered prompt, as every stage presents them to the model.

    No special tokens are added: the chat template already wrote any BOS (the R1 template
    begins with `{{ bos_token }}`), and tokenizers that add BOS to every text (Llama's, R1's)
    would put in a second one. Generation (hf, vLLM), ppo's replayed prompts and, through
    `trl_prompt`, TRL's own tokenization in sft, dpo and online ppo all give these ids."""
    return tokenizer(prompt_text, add_special_tokens=False)["input_ids"]


def trl_prompt(tokenizer, prompt_text: str) -> str:
    """The string to hand TRL for a rendered prompt so that TRL's tokenization gives
    `prompt_token_ids(tokenizer, prompt_text)`.

    TRL tokenizes string prompts (sft's prompt-completion pairs, dpo's pairs, online GRPO's
    prompts) with special tokens on: a tokenizer that adds BOS itself, under a template that
    wrote it, gives two. Where the text begins with exactly what the tokenizer adds, that text
    is dropped and the tokenizer puts it back as the same ids. A tokenizer that adds tokens the
    template does not write (or adds them at the end) cannot be matched by any string: a clear
    error rather than training on a prompt generation never sees."""
    wanted = prompt_token_ids(tokenizer, prompt_text)
    if tokenizer(prompt_text)["input_ids"] == wanted:
        return prompt_text
    added = tokenizer("")["input_ids"]  # what the tokenizer adds around any text
    prefix = "".join(tokenizer.convert_ids_to_tokens(added))
    if added and prompt_text.startswith(prefix):
        stripped = prompt_text[len(prefix) :]
        if tokenizer(stripped)["input_ids"] == wanted:
            return stripped
    from looper.errors import LooperError

    raise LooperError(
        f"this model's tokenizer adds {prefix!r} to every text it encodes, but its chat template does not "
        "begin the prompt with it: TRL would train on prompt tokens that generation never sees; "
        "use a chat template that writes the tokenizer's special tokens (most begin with {{ bos_token }})"
    )


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
