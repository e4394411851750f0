"""What every export format says about the tokenizer: bos / eos ids and the chat template in Jinja
(gpt.interop writes them for transformers, gpt.gguf_export for llama.cpp)."""

from __future__ import annotations


def special_token_ids(tok) -> dict:
    """bos/eos ids for config.json from the tokenizer itself: end-of-text (and a chat model's <|end|>) ends
    generation, begin-of-text is <|bos|> when a stage added it, else end-of-text as in GPT-2; None where the
    tokenizer has no such token (a char model without special tokens)."""
    from gpt.chat import END

    eos = [i for i in (tok.eot_id, tok.special_id(END) if END in tok.special else None) if i is not None]
    bos = tok.bos_id if tok.bos_id is not None else tok.eot_id
    return {"bos_token_id": bos, "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None}


# The chat template of gpt/chat.py in Jinja, for tokenizer_config.json: transformers' apply_chat_template and vLLM's
# chat endpoint render messages with it. Each message is <|role|>content<|end|>; a generation prompt adds
# <|assistant|>. The special tokens are added tokens of the exported tokenizer, so the text tokenizes to our ids.
# As serve.py's /v1/chat/completions: "developer" (OpenAI's newer name) is the system role, any other role than
# system / user / assistant is refused, and content given as a list of text parts is their text joined (a part of
# another type, an image, is refused).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'developer' %}{% set role = 'system' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{% if role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role ' + role + ' is not one of system, developer, user, assistant') }}{% endif %}"
    "{% if message['content'] is string %}{% set content = message['content'] %}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] != 'text' %}"
    "{{ raise_exception('a content part of type ' + part['type'] + ' is not text') }}{% endif %}{% endfor %}"
    "{% set content = message['content'] | map(attribute='text') | join('') %}{% endif %}"
    "{{ '<|' + role + '|>' + content + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
