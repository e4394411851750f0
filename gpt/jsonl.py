"""JSONL readers for fine-tuning and evaluation data: instruction / chat, preference pairs, classification,
prompts, prompts with reference answers; and the seeded train / val split of what they read.

Every record is checked as it is read; a bad line is reported as `file:line: what is wrong`, and
nothing is trained on until the whole file has been read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gpt.errors import UserError

ROLES = ("system", "user", "assistant")


def json_lines(p: Path, where=lambda p, n: f"{p}:{n}"):
    """Yield (line number, parsed value) of each non-blank line of the JSONL file `p`. A line that is not
    UTF-8, not JSON, or nested too deeply for the parser is a UserError naming `where(p, line)`."""
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where(p, n)}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                f"save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where(p, n)}: not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise UserError(f"{where(p, n)}: JSON nested too deeply to read; a record is a flat object") from None


def read_jsonl(path: str | Path, key: str = "data") -> list[tuple[int, dict]]:
    """-> [(line number, record)] of a JSONL file (blank lines skipped); each record must be an object.
    `key` is the option the file was passed as, named when it is missing or empty."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise UserError(f"{key} file {str(path)!r} does not exist; pass {key}=<a .jsonl file>")
    rows = []
    for n, rec in json_lines(p):
        if not isinstance(rec, dict):
            raise UserError(f"{p}:{n}: expected a JSON object, got {type(rec).__name__}")
        rows.append((n, rec))
    if not rows:
        raise UserError(f"{key} file {str(p)!r} has no records; expected one JSON object per line")
    return rows


def _text(rec: dict, key: str, where: str, allow_empty: bool = False) -> str:
    if key not in rec:
        raise UserError(f"{where}: missing key {key!r} (has {sorted(rec)})")
    value = rec[key]
    if not isinstance(value, str) or (not allow_empty and not value):
        raise UserError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    return value


def to_messages(rec: dict, where: str) -> list[dict]:
    """An instruction record -> chat messages [{"role", "content"}]. Accepted forms:
    {"prompt", "completion"}, {"instruction", "response"} (optional "input" appended to the
    instruction), {"messages": [{"role", "content"}, ...]} with at least one assistant message."""
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise UserError(f"{where}: messages[{i}] must be {{'role': one of {list(ROLES)}, 'content': str}}, "
                                f"got {m!r}")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise UserError(f"{where}: 'messages' has no assistant message to learn from")
        return out
    if "prompt" in rec or "completion" in rec:
        return [{"role": "user", "content": _text(rec, "prompt", where)},
                {"role": "assistant", "content": _text(rec, "completion", where)}]
    if "instruction" in rec or "response" in rec:
        prompt = _text(rec, "instruction", where)
        if rec.get("input"):
            prompt += "\n" + _text(rec, "input", where)
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(rec, "response", where)}]
    raise UserError(f"{where}: expected keys prompt/completion, instruction/response or messages; got {sorted(rec)}")


def read_instructions(path: str | Path) -> list[list[dict]]:
    """SFT data -> one message list per record."""
    return [to_messages(rec, f"{path}:{n}") for n, rec in read_jsonl(path)]


_REFERENCE_KEYS = (("prompt", "completion"), ("instruction", "response"))


def read_references(path: str | Path, key: str = "instructions") -> list[dict]:
    """Prompts with reference answers for evaluate.py, one {"prompt", "completion"} or {"instruction",
    "response"} object per line -> [{"prompt", "reference", "line"}] (unlike read_instructions, the texts
    are kept as they are: no "input" field, no chat messages). Blank lines are skipped."""
    out = []
    for n, rec in read_jsonl(path, key):
        where = f"{Path(str(path)).expanduser()}:{n}"
        keys = next((k for k in _REFERENCE_KEYS if all(x in rec for x in k)), None)
        if keys is None:
            raise UserError(f"{where}: expected an object with \"prompt\" and \"completion\" (or \"instruction\" "
                            f"and \"response\"), found {sorted(rec)}")
        prompt, reference = rec[keys[0]], rec[keys[1]]
        if not isinstance(prompt, str) or not isinstance(reference, str):
            raise UserError(f"{where}: \"{keys[0]}\" and \"{keys[1]}\" must be strings")
        out.append({"prompt": prompt, "reference": reference, "line": n})
    return out


def read_texts(path: str | Path) -> list[str]:
    """Plain documents for stage=completion: JSONL {"text"} records, or a .txt file whose documents are
    separated by blank lines."""
    p = Path(str(path)).expanduser()
    if p.suffix == ".txt":
        if not p.is_file():
            raise UserError(f"data file {str(path)!r} does not exist; pass data=<a .jsonl or .txt file>")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"data file {str(p)!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                            f"{e.start}); save it as UTF-8") from None
        docs = [d.strip("\n") for d in text.split("\n\n") if d.strip()]
        if not docs:
            raise UserError(f"data file {str(p)!r} has no text; documents are separated by blank lines")
        return docs
    return [_text(rec, "text", f"{path}:{n}") for n, rec in read_jsonl(path)]


def read_pairs(path: str | Path) -> list[dict]:
    """Preference data {"prompt", "chosen", "rejected"} -> list of those dicts."""
    out = []
    for n, rec in read_jsonl(path):
        where = f"{path}:{n}"
        pair = {k: _text(rec, k, where) for k in ("prompt", "chosen", "rejected")}
        if pair["chosen"] == pair["rejected"]:
            raise UserError(f"{where}: 'chosen' and 'rejected' are the same text; a pair needs two different answers")
        out.append(pair)
    return out


def read_prompts(path: str | Path) -> list[dict]:
    """Prompts for RL stages: {"prompt", optional "answer"/"completion" (the reference answer)}."""
    out = []
    for n, rec in read_jsonl(path):
        where = f"{path}:{n}"
        answer = rec.get("answer", rec.get("completion"))
        if answer is not None and not isinstance(answer, str):
            raise UserError(f"{where}: 'answer' must be a string, got {answer!r}")
        out.append({"prompt": _text(rec, "prompt", where), "answer": answer})
    return out


def read_labelled(path: str | Path) -> list[tuple[str, str]]:
    """Classification data {"text", "label"} -> [(text, label)] (labels as strings)."""
    out = []
    for n, rec in read_jsonl(path):
        where = f"{path}:{n}"
        label = rec.get("label")
        if not isinstance(label, (str, int)) or isinstance(label, bool):
            raise UserError(f"{where}: 'label' must be a string or an integer, got {label!r}")
        out.append((_text(rec, "text", where), str(label)))
    return out


def split_val(items: list, val_items: list | None, fraction: float, seed: int, where: str) -> tuple[list, list]:
    """(train, val): `val_items` if given, else a seeded held-out fraction of `items`."""
    if val_items is not None:
        return items, val_items
    if len(items) < 2:
        raise UserError(f"{where}: needs at least 2 records to hold out a validation split (or pass val_data=)")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(items), generator=g).tolist()
    n_val = min(len(items) - 1, max(1, round(len(items) * fraction)))
    return [items[i] for i in perm[n_val:]], [items[i] for i in perm[:n_val]]
