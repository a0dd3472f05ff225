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


def tiny_model(path: str | Path, *, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Save a random tiny Llama causal LM + tokenizer under `path`; returns the path."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = tiny_tokenizer()
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
