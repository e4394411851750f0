"""The chat template shared by fine-tuning, infer.py and the RL stages.

Each message is `<|role|> content <|end|>` with dedicated special tokens (appended to the tokenizer's
vocabulary, so they survive save/load and cannot be typed by a user). Training masks every token
except the assistant's content and its `<|end|>`; generation appends `<|assistant|>` and stops at
`<|end|>` (the end-of-answer token).
"""

from __future__ import annotations

from gpt.tokenizer import has_token, with_special_tokens

SPECIAL = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
END = "<|end|>"


def answer_stop_ids(tok, chat: bool = True) -> tuple[int, ...]:
    """The ids that end a generated answer: end-of-text where the tokenizer has one, and for a chat answer its
    <|end|> before it (the eos ids gpt.export_meta writes, which vLLM and llama.cpp stop at), then the role tokens
    that start a turn (<|user|>, <|system|>, <|assistant|>): a model that skips <|end|> and goes on with the next
    turn has ended its answer (what it would write as the user is not part of it)."""
    turns = [tok.special_id(t) for t in SPECIAL if t != END and has_token(tok, t)] if chat else []
    return tuple(i for i in (tok.special_id(END) if chat else None, tok.eot_id, *turns) if i is not None)


class ChatText:
    """A chat answer's text: the tokenizer's decode without the chat template's special tokens (a reply that
    starts a new turn, <|user|>, shows nothing of it), as vLLM's skip_special_tokens."""

    def __init__(self, tok):
        self.tok, self.skip = tok, {tok.special_id(t) for t in SPECIAL}

    def decode(self, ids) -> str:
        return self.tok.decode([i for i in ids if i not in self.skip])


def chat_tokenizer(tok):
    """`tok` with the chat template's special tokens (a copy; unchanged if it has them already)."""
    return tok if all(t in tok.special for t in SPECIAL) else with_special_tokens(tok, SPECIAL)


def encode_chat(tok, messages: list[dict], generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """messages -> (ids, train_mask): train_mask[i] is True where ids[i] is an assistant answer token
    (its content and closing <|end|>). generation_prompt appends <|assistant|> to prompt for an answer."""
    ids: list[int] = []
    mask: list[bool] = []
    end = tok.special_id(END)
    for m in messages:
        body = tok.encode(m["content"]) + [end]
        learn = m["role"] == "assistant"
        ids += [tok.special_id(f"<|{m['role']}|>")] + body
        mask += [False] + [learn] * len(body)
    if generation_prompt:
        ids.append(tok.special_id("<|assistant|>"))
        mask.append(False)
    return ids, mask


def prompt_ids(tok, prompt: str) -> list[int]:
    """A single user prompt, ready for the assistant's answer."""
    return encode_chat(tok, [{"role": "user", "content": prompt}], generation_prompt=True)[0]
