"""Test helpers: a tiny random Llama model that later tests load through the real code.

`tiny_model(path)` builds, offline and in about a second, a small byte-level BPE tokenizer
with a ChatML chat template and a random-initialised Llama-architecture causal LM, and
saves both with `save_pretrained` (safetensors). Tests then exercise the same
`from_pretrained` paths a user's hub model goes through, without any download.
"""

from __future__ import annotations

from pathlib import Path

# ChatML, as SmolLM2 and many instruct models use; `add_generation_prompt` opens the
# assistant turn. `{% generation %}` marks assistant tokens for TRL's assistant-only loss.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def _corpus() -> list[str]:
    """Text the tokenizer's merges are learned from: math-problem-like sentences and digits."""
    from looper.data.synthetic import generate

    problems = generate(200, seed=0, difficulty=3)
    return [p["question"] + "\n" + p["answer"] for p in problems] + [
        " ".join(str(i) for i in range(1000)),
        "Solve the problem step by step. #### The answer is \\boxed{} <think> </think> $ % , . ?",
    ]


def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer (covers any text) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# DeepSeek-R1-distill shaped (reduced to user and assistant turns): the template writes BOS
# itself, the generation prompt pre-fills `<think>\n`, and assistant turns lose what precedes
# `</think>`. With `r1_tokenizer`, whose tokenizer ALSO adds BOS to any text it encodes: the
# combination that gives two BOS when a rendered prompt is tokenized with special tokens.
R1_BOS, R1_EOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>"
R1_USER, R1_ASSISTANT = "<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>"
R1_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '" + R1_USER + "' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '" + R1_ASSISTANT + "' + content + '" + R1_EOS + "' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + R1_ASSISTANT + "<think>\\n' }}{% endif %}"
)


def r1_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer shaped like DeepSeek-R1-Distill-Llama's: adds BOS to every text
    it encodes (`tokenizer("x")` starts with BOS), chat template beginning with `{{ bos_token }}`,
    generation prompt ending `<think>\\n` (`<think>`, `</think>` are added, non-special tokens)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [R1_BOS, R1_EOS, R1_USER, R1_ASSISTANT, "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    bos_id = tok.token_to_id(R1_BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{R1_BOS} $A", pair=f"{R1_BOS} $A {R1_BOS} $B", special_tokens=[(R1_BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=R1_BOS, eos_token=R1_EOS, pad_token="<pad>", unk_token=R1_EOS
    )
    fast.chat_template = R1_CHAT_TEMPLATE
    return fast


def tiny_model(
    path: str | Path, *, hidden_size: int = 64, layers: int = 2, seed: int = 0, tokenizer=None
) -> Path:
    """Save a random tiny Llama causal LM + tokenizer (default `tiny_tokenizer()`) under `path`;
    returns the path."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
