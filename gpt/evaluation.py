"""evaluate.py's logic: score a checkpoint and write the scores into its own run folder.

A checkpoint is evaluated from the file alone: model, tokenizer and, when it was trained on the bundled
corpus, that corpus (rebuilt from checked plain values; a text file or dataset a checkpoint names is never
read: pass it with `data=`, whose file is scored whole by default). Each evaluation that applies adds flat,
prefixed metrics to one report:

    language modelling  every token of a data split: `<split>/loss`, `perplexity`, `bits_per_byte`
    instructions        greedy answers to a JSONL of prompts (a chat model's in its chat template, ending at
                        <|end|>): `instruct/exact_match`, `bleu`, `rouge1/2/L`; needs no corpus
    samples             a few sampled continuations, saved to samples.txt

The report goes to metrics.json (plus generations.jsonl and samples.txt) and is printed as a table;
`evaluate.py -m ckpt=a,b` ends with one comparison table across the jobs (`ComparisonTable`), and
`evaluate.py plot=<folder>` only draws the loss and learning-rate plots (gpt.plots).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from gpt.chat import END, SPECIAL, prompt_ids
from gpt.config import _only_setup_files, run_dir, user_error_in, write_json
from gpt.data import Shakespeare, TextSource
from gpt.errors import UserError
from gpt.generate import generate_batch, generate_tokens
from gpt.inference import dtype_option, encode_prompt, load_for_inference
from gpt.jsonl import json_lines
from gpt.tracking import job_labels, sweep_jobs

log = logging.getLogger("gpt")


# ---- language modelling: perplexity and bits per byte -----------------------------------------

SPLITS = ("all", "val", "train")


def user_source(data: DictConfig) -> tuple[TextSource, float]:
    """data= from evaluate.py's command line (a conf/data option, the user's own config) -> (source, val_fraction).

    val_fraction is evaluation's own setting, checked here: 1.0 is allowed (the whole file is the val split).
    It is left out when the source is built, whose own check is for training (which needs both splits).
    """
    from hydra.utils import instantiate

    node = OmegaConf.to_container(data, resolve=True)
    fraction = node.pop("val_fraction", 0.1)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise UserError(f"data.val_fraction={fraction} must be a number in (0, 1] "
                        f"(1.0: the whole file is the val split)")
    try:
        return instantiate(node, _recursive_=False), float(fraction)
    except Exception as e:
        err = user_error_in(e)
        if err is None:
            raise
        raise UserError(f"data: {err}") from None


_PLAY = re.compile(r"[a-z0-9-]+/[a-z0-9-]+")  # a bundled play's name, e.g. tragedies/hamlet


def _shown(value, limit: int = 120) -> str:
    """A value read from a checkpoint, safe to print in one line (quoted, escaped, cut short)."""
    text = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def checkpoint_source(ckpt: dict) -> tuple[TextSource | None, str]:
    """The checkpoint's own training corpus, when evaluate.py may re-read it -> (source or None, what it was).

    Only the bundled corpus is rebuilt, from plain values checked here (plays: names of bundled plays;
    val_fraction: a number in (0, 1)), by our own code: nothing in the checkpoint names the class, and no
    node of it is instantiated. A text file or Hugging Face dataset the checkpoint names is never read (a
    shared checkpoint must not make evaluate.py open a path or fetch a dataset): None, and a line saying
    what it was and how to pass it with data=.
    """
    config = ckpt.get("config")
    node = config.get("data") if isinstance(config, dict) else None
    node = node if isinstance(node, dict) else {}
    target, fraction = node.get("_target_"), node.get("val_fraction", 0.1)
    plain_fraction = not isinstance(fraction, bool) and isinstance(fraction, (int, float)) and 0.0 < fraction < 1.0
    if target == "gpt.data.Shakespeare":
        plays = node.get("plays")
        if not (isinstance(plays, list) and plays and all(isinstance(p, str) and _PLAY.fullmatch(p) for p in plays)
                and plain_fraction and set(node) <= {"_target_", "plays", "val_fraction", "cache_dir"}):
            return None, (f"the checkpoint's data (bundled Shakespeare) has values evaluate.py does not accept "
                          f"(plays={_shown(plays)}, val_fraction={_shown(fraction)}); pass data=shakespeare")
        return Shakespeare(plays=plays, val_fraction=float(fraction)), "the bundled Shakespeare plays"
    if target == "gpt.data.TextFiles":
        path = node.get("path")
        shown = _shown(path) if isinstance(path, str) else "<file>"
        return None, (f"the checkpoint was trained on text data.path={shown}, which evaluate.py does not re-read "
                      f"from a checkpoint; pass data=text data.path={shown} to evaluate on it")
    if target == "gpt.data.HFDataset":
        name = node.get("name")
        shown = _shown(name) if isinstance(name, str) else "<dataset>"
        return None, (f"the checkpoint was trained on dataset data.name={shown}, which evaluate.py does not "
                      f"fetch from a checkpoint; pass data=hf data.name={shown} to evaluate on it")
    return None, (f"the checkpoint names no text corpus to score (its data: {_shown(target) if target else 'none'}); "
                  f"pass data=text data.path=<file> (or data=shakespeare, data=hf data.name=...) for perplexity")


def split_tokens(source: TextSource, tokenizer, split: str, val_fraction: float | None = None) -> np.ndarray:
    """The token ids of `split` of `source`, encoded with the checkpoint's tokenizer: "all" (every token),
    "val" (the last val_fraction of them, default the source's own) or "train" (the rest).

    Documents are joined and split exactly as training's token cache does (gpt.data.TextSource), so the
    checkpoint's own data gives back the val tokens it was validated on; the tokenizer is never refitted.
    """
    if split not in SPLITS:
        raise UserError(f"perplexity.split={split!r} must be one of {', '.join(SPLITS)}")
    sep = [tokenizer.eot_id] if tokenizer.eot_id is not None else None
    ids: list[int] = []
    for i, doc in enumerate(d for d in source.documents() if d):
        if i:
            ids.extend(sep if sep is not None else tokenizer.encode("\n\n"))
        try:
            ids.extend(tokenizer.encode(doc))
        except UserError as e:
            raise UserError(f"evaluating {source.describe()}: {e}") from None
    n_val = int(len(ids) * (source.val_fraction if val_fraction is None else val_fraction))
    tokens = {"all": ids, "val": ids[len(ids) - n_val:], "train": ids[:len(ids) - n_val]}[split]
    if len(tokens) < 2:
        raise UserError(f"{source.describe()} gives {len(tokens)} {split} tokens; at least 2 are needed")
    return np.asarray(tokens, dtype=np.int64)


def utf8_bytes(tokenizer, ids: list[int]) -> int:
    """UTF-8 length of the text the tokens `ids` stand for (exact per token for tiktoken encodings,
    whose tokens may hold part of a multi-byte character)."""
    enc = getattr(tokenizer, "enc", None)
    if enc is not None:
        return sum(len(b) for b in enc.decode_tokens_bytes(ids))
    return len(tokenizer.decode(ids).encode("utf-8"))


def windows(n: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """Cover the n - 1 next-token targets of a stream of n tokens, each exactly once.

    -> [(begin, end, skip)]: a window feeds tokens[begin:end] (at most block_size) and predicts
    tokens[begin+1:end+1]; its first `skip` targets were scored by the previous window and are not
    scored again. Windows start every `stride` tokens: stride = block_size gives disjoint windows,
    a smaller stride gives later targets more context at more compute.
    """
    out, begin, done = [], 0, 0
    while True:
        end = min(begin + block_size, n - 1)
        out.append((begin, end, max(0, done - begin)))
        done = end
        if end >= n - 1:
            return out
        begin += stride


@torch.no_grad()
def language_model_metrics(model, tokens: np.ndarray, tokenizer, batch_size: int = 8, stride: int | None = None,
                           autocast=contextlib.nullcontext, prefix: str = "val") -> dict:
    """Token-weighted next-token loss over a whole token stream tokens (N,).

    Windows (see `windows`) are batched (B, block_size); padding of short windows and targets already
    scored get target -1, which the model's loss ignores, so the mean loss of a batch times its number
    of scored targets is its summed NLL. Over the N - 1 targets:
        loss = total NLL / (N - 1)  (nats/token),  perplexity = exp(loss),
        bits_per_byte = total NLL / ln 2 / UTF-8 bytes of the targets' text  (comparable across tokenizers).
    """
    block = model.config.block_size
    stride = block if stride is None else int(stride)
    if not 1 <= stride <= block:
        raise UserError(f"perplexity.stride={stride} must be between 1 and model.block_size={block}")
    device = model.transformer.wte.weight.device
    model.eval()
    data = torch.as_tensor(tokens, dtype=torch.long)
    spans = windows(len(data), block, stride)
    total_nll, scored = 0.0, 0
    for first in range(0, len(spans), batch_size):
        chunk = spans[first:first + batch_size]
        x = torch.zeros(len(chunk), block, dtype=torch.long)
        y = torch.full((len(chunk), block), -1, dtype=torch.long)
        for row, (begin, end, skip) in enumerate(chunk):
            x[row, :end - begin] = data[begin:end]
            y[row, skip:end - begin] = data[begin + 1 + skip:end + 1]
        count = int((y != -1).sum())
        with autocast():
            _, loss = model(x.to(device), y.to(device))
        total_nll += float(loss) * count
        scored += count
    n_bytes = utf8_bytes(tokenizer, data[1:].tolist())
    mean = total_nll / scored
    return {f"{prefix}/loss": mean, f"{prefix}/perplexity": math.exp(mean),
            f"{prefix}/bits_per_byte": total_nll / math.log(2) / max(n_bytes, 1),
            f"{prefix}/tokens": scored, f"{prefix}/bytes": n_bytes}


# ---- instruction data: greedy answers, exact match, BLEU, ROUGE -------------------------------

_INSTRUCTION_KEYS = (("prompt", "completion"), ("instruction", "response"))


def read_instructions(path: str | Path, tokenizer=None) -> list[dict]:
    """A JSONL file, one {"prompt", "completion"} or {"instruction", "response"} object per line
    -> [{"prompt", "reference", "line"}]. Blank lines are skipped; anything else malformed, or a prompt
    `tokenizer` cannot encode, is a UserError naming the file and line."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise UserError(f"instructions={str(path)!r} does not exist; pass a JSONL file")
    records = []
    for lineno, obj in json_lines(p, lambda p, n: f"instructions file {p} line {n}"):  # UTF-8, JSON, depth
        where = f"instructions file {p} line {lineno}"
        keys = next((k for k in _INSTRUCTION_KEYS if isinstance(obj, dict) and all(x in obj for x in k)), None)
        if keys is None:
            found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise UserError(f"{where}: expected an object with \"prompt\" and \"completion\" (or \"instruction\" "
                            f"and \"response\"), found {found}")
        prompt, reference = obj[keys[0]], obj[keys[1]]
        if not isinstance(prompt, str) or not isinstance(reference, str):
            raise UserError(f"{where}: \"{keys[0]}\" and \"{keys[1]}\" must be strings")
        if tokenizer is not None:
            try:
                tokenizer.encode(prompt)
            except UserError as e:
                raise UserError(f"{where}: {e}") from None
        records.append({"prompt": prompt, "reference": reference, "line": lineno})
    if not records:
        raise UserError(f"instructions file {p} holds no records")
    return records


def cut_at_stop(text: str, stop: list[str]) -> str:
    """text up to the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def is_chat(tokenizer) -> bool:
    """Whether a tokenizer carries the chat template's tokens (a finetune.py stage=sft model and its children)."""
    return all(t in tokenizer.special for t in SPECIAL)


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, stop: list[str] | None = None,
                   batch_size: int = 64) -> list[str]:
    """The greedy (temperature 0) answer to each prompt, batched as the SFT stage's evaluation batches them.

    A chat model (is_chat) gets each prompt in the chat template, as infer.py chat=true and stage=sft build
    it (gpt.chat.prompt_ids), and its answer ends at <|end|>; any other model continues the prompt as it
    saw text in training (gpt.inference.encode_prompt) up to end-of-text. Either way the answer is cut at
    the first of `stop` (None: a blank line for a plain language model, nothing more for a chat model).
    batch_size prompts are answered together (SFT's evaluation: its eval_examples, 64 by default, in one batch).
    """
    if is_chat(tokenizer):
        ids, end = [prompt_ids(tokenizer, p) for p in prompts], tokenizer.special_id(END)
        stop = [] if stop is None else stop
    else:
        ids = [encode_prompt(tokenizer, p, model.config.block_size, out=None) for p in prompts]
        end, stop = tokenizer.eot_id, ["\n\n"] if stop is None else stop
    outs: list[list[int]] = []
    for i in range(0, len(ids), batch_size):
        outs += generate_batch(model, ids[i:i + batch_size], max_new_tokens, temperature=0.0, eot_id=end)
    return [cut_at_stop(tokenizer.decode(o), stop) for o in outs]


# Scripts written without spaces between words: scored one character per token.
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df"
_KANA = "\u3040-\u30ff"
_CJK = f"\u3100-\u312f{_KANA}{_HAN}"  # bopomofo, kana, Han


class MixedScriptTokenizer:
    """ROUGE tokenizer for any language: each CJK character is one token, other text splits into
    lower-cased runs of letters and digits; punctuation is dropped. (rouge_score's default tokenizer
    keeps only [a-z0-9], so it would score Chinese text as empty.)"""

    _token = re.compile(rf"(?=\w)[{_CJK}]|[^\W_{_CJK}]+")

    def tokenize(self, text: str) -> list[str]:
        return self._token.findall(text.lower())


def bleu_tokenize(texts: list[str]) -> str:
    """sacrebleu tokenizer for the references: "char" for Japanese kana, "zh" (one token per Chinese
    character, 13a for the rest) for Chinese, "13a" (sacrebleu's standard) otherwise."""
    joined = "".join(texts)
    if re.search(f"[{_KANA}]", joined):
        return "char"
    return "zh" if re.search(f"[{_HAN}]", joined) else "13a"


def normalise(text: str) -> str:
    """Exact match compares texts with surrounding whitespace stripped and inner runs collapsed to one space."""
    return " ".join(text.split())


def text_metrics(hypotheses: list[str], references: list[str], prefix: str = "instruct") -> tuple[dict, list[dict]]:
    """Corpus scores (all on a 0-100 scale) and per-item scores of hypotheses against references.

    -> ({prefix/n, exact_match (% of items), bleu (sacrebleu corpus BLEU), rouge1, rouge2, rougeL
    (mean ROUGE F1 x 100, rouge-score)}, [{"exact_match", "bleu", "rougeL"} per item]).
    """
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references) or not references:
        raise ValueError("need as many hypotheses as references, at least one")
    tokenize = bleu_tokenize(references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=MixedScriptTokenizer())
    items = []
    rouge = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for hyp, ref in zip(hypotheses, references):
        scores = scorer.score(ref, hyp)
        for key in rouge:
            rouge[key] += scores[key].fmeasure
        items.append({"exact_match": normalise(hyp) == normalise(ref),
                      "bleu": sacrebleu.sentence_bleu(hyp, [ref], tokenize=tokenize).score,
                      "rougeL": 100 * scores["rougeL"].fmeasure})
    n = len(references)
    metrics = {f"{prefix}/n": n, f"{prefix}/exact_match": 100 * sum(i["exact_match"] for i in items) / n,
               f"{prefix}/bleu": sacrebleu.corpus_bleu(hypotheses, [references], tokenize=tokenize).score}
    metrics.update({f"{prefix}/{k}": 100 * v / n for k, v in rouge.items()})
    return metrics, [dict(i, bleu_tokenize=tokenize) for i in items]


def instruction_metrics(model, tokenizer, records: list[dict], max_new_tokens: int, stop: list[str] | None,
                        out_file: Path | None = None, batch_size: int = 64) -> dict:
    """Answer every prompt of `records` (read_instructions) greedily (greedy_answers) and score the answers
    against their references; each prompt, reference, answer and its scores go to out_file (JSONL)."""
    answers = greedy_answers(model, tokenizer, [r["prompt"] for r in records], max_new_tokens, stop, batch_size)
    metrics, items = text_metrics([a.strip() for a in answers], [r["reference"] for r in records])
    if out_file is not None:
        with open(out_file, "w", encoding="utf-8") as f:
            for rec, answer, item in zip(records, answers, items):
                f.write(json.dumps({"prompt": rec["prompt"], "reference": rec["reference"], "generation": answer,
                                    **item}, ensure_ascii=False) + "\n")
    return metrics


# ---- samples ----------------------------------------------------------------------------------

@torch.no_grad()
def sample_texts(model, tokenizer, prompt: str, num: int, max_new_tokens: int, temperature: float,
                 top_k: int | None, seed: int, autocast) -> list[str]:
    """`num` sampled continuations of `prompt` (prompt included), one batch, seeded."""
    device = model.transformer.wte.weight.device
    ids = encode_prompt(tokenizer, prompt, model.config.block_size)
    idx = torch.tensor([ids] * num, dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with autocast():
        new = list(generate_tokens(model, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                   eot_id=tokenizer.eot_id, generator=g))
    rows = torch.stack(new, dim=1).tolist() if new else [[] for _ in range(num)]
    return [prompt + tokenizer.decode([t for t in row if t != tokenizer.eot_id]) for row in rows]


# ---- tables -----------------------------------------------------------------------------------

def _cell(value) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ---- evaluate.py ------------------------------------------------------------------------------

def classifier_metrics(model, tokenizer, labels: list[str], path: str, batch_size: int, autocast) -> dict:
    """Accuracy and confusion matrix (rows: true label, columns: predicted; label order `labels`) of a
    classifier checkpoint on {"text", "label"} JSONL, encoded and pooled as stage=classify does."""
    from gpt.jsonl import read_labelled
    from gpt.stages.classify import encode_texts
    from gpt.stages.reward import score_batch

    records = read_labelled(path)
    unknown = sorted({lab for _, lab in records} - set(labels))
    if unknown:
        raise UserError(f"{path}: labels {unknown} are not among the classifier's labels {labels}")
    ids = encode_texts(tokenizer, [t for t, _ in records], model.config.block_size, str(path))
    truth = [labels.index(lab) for _, lab in records]
    predicted: list[int] = []
    device = model.transformer.wte.weight.device
    with torch.no_grad(), autocast():
        for i in range(0, len(ids), batch_size):
            predicted += model.classify(*score_batch(ids[i:i + batch_size], device)).argmax(-1).tolist()
    confusion = [[0] * len(labels) for _ in labels]
    for t, p in zip(truth, predicted):
        confusion[t][p] += 1
    return {"classify/accuracy": sum(t == p for t, p in zip(truth, predicted)) / len(truth),
            "classify/examples": len(truth), "classify/labels": list(labels), "classify/confusion": confusion}


def reward_metrics(model, tokenizer, path: str, batch_size: int, autocast) -> dict:
    """Pairwise accuracy (chosen scored above rejected) and mean margin of a reward checkpoint on
    {"prompt", "chosen", "rejected"} JSONL, encoded with the chat template as stage=reward does."""
    from gpt.jsonl import read_pairs
    from gpt.stages.dpo import encode_pair
    from gpt.stages.reward import score_batch

    pairs = [tuple(ids[-model.config.block_size:] for ids, _ in encode_pair(tokenizer, p)) for p in read_pairs(path)]
    margins: list[float] = []
    device = model.transformer.wte.weight.device
    with torch.no_grad(), autocast():
        for i in range(0, len(pairs), batch_size):
            rows = [s for pair in pairs[i:i + batch_size] for s in pair]  # chosen, rejected, chosen, ...
            r = model.score(*score_batch(rows, device))
            margins += (r[0::2] - r[1::2]).tolist()
    return {"reward/pairwise_accuracy": sum(m > 0 for m in margins) / len(margins),
            "reward/mean_margin": sum(margins) / len(margins), "reward/pairs": len(margins)}


def checkpoint_info(ckpt: dict, model) -> dict:
    from gpt.quantize import num_params

    tok = ckpt["tokenizer"]
    return {"path": ckpt["path"], "step": int(ckpt["step"]), "params": num_params(model),
            "tokenizer": tok.get("name", tok.get("type")), "train_val_loss": ckpt.get("val_loss")}


def check_settings(cfg: DictConfig) -> None:
    """Counts in conf/evaluate.yaml must be positive (samples.num may be 0: no samples)."""
    for key, value, least in (("perplexity.batch_size", cfg.perplexity.batch_size, 1),
                              ("perplexity.max_tokens", cfg.perplexity.get("max_tokens"), 1),
                              ("perplexity.stride", cfg.perplexity.get("stride"), 1),
                              ("generation.max_new_tokens", cfg.generation.max_new_tokens, 1),
                              ("samples.num", cfg.samples.num, 0),
                              ("samples.max_new_tokens", cfg.samples.max_new_tokens, 1)):
        if key in ("perplexity.max_tokens", "perplexity.stride") and value is None:
            continue  # null: every token / disjoint windows
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UserError(f"{key}={value} must be an integer >= {least}")
    split = cfg.perplexity.get("split")
    if split is not None and split not in SPLITS:
        raise UserError(f"perplexity.split={split!r} must be one of {', '.join(SPLITS)} (or null)")
    stop = cfg.generation.get("stop")
    if stop is not None and not (OmegaConf.is_list(stop) and all(isinstance(x, str) for x in stop)):
        raise UserError(f"generation.stop={stop} must be a list of strings (or null)")


def lm_data(cfg: DictConfig, ckpt: dict) -> tuple[TextSource | None, str, float | None, str]:
    """What language-model metrics score -> (source or None, split, val_fraction, a note when None).

    data= on the command line: that source, by default all of it (perplexity.split=val|train cut it at
    data.val_fraction). Without data=: the checkpoint's own corpus where evaluate.py may re-read it
    (checkpoint_source), by default its val split as training cut it.
    """
    split = cfg.perplexity.get("split")
    if cfg.get("data") is not None:
        source, fraction = user_source(cfg.data)
        return source, split or "all", fraction, ""
    source, note = checkpoint_source(ckpt)
    return source, split or "val", None, note


def evaluate(cfg: DictConfig, out=sys.stdout) -> dict:
    """Evaluate cfg.ckpt (see conf/evaluate.yaml), write metrics.json, generations.jsonl and samples.txt into
    the run folder, print the table; -> the report {"checkpoint", "data", "metrics", "files"}."""
    check_settings(cfg)
    model, tokenizer, ckpt = load_for_inference(cfg.ckpt, cfg.device, cfg.get("quantize"), dtype_option(cfg))
    autocast = contextlib.nullcontext  # the weights are already in the chosen dtype (cfg.dtype): no autocast
    folder = run_dir()
    report = {"checkpoint": checkpoint_info(ckpt, model), "data": {}, "metrics": {}, "files": {}}
    records = read_instructions(cfg.instructions, tokenizer) if cfg.get("instructions") else None  # fail early

    head = "classifier" if hasattr(model, "classify") else "reward" if hasattr(model, "score") else None
    if head == "classifier":  # a classification head: accuracy and confusion matrix instead of perplexity
        if not cfg.get("labelled"):
            raise UserError("this is a classifier checkpoint; pass labelled=<JSONL of {\"text\", \"label\"}>")
        report["data"] = {"source": str(cfg.labelled), "split": "labelled"}
        report["metrics"].update(classifier_metrics(model, tokenizer, list(ckpt["labels"]), cfg.labelled,
                                                    int(cfg.perplexity.batch_size), autocast))
        return finish(report, folder, out)
    if head == "reward":  # a scalar reward head: pairwise accuracy instead of perplexity
        if not cfg.get("pairs"):
            raise UserError("this is a reward checkpoint; pass pairs=<JSONL of {\"prompt\", \"chosen\", \"rejected\"}>")
        report["data"] = {"source": str(cfg.pairs), "split": "pairs"}
        report["metrics"].update(reward_metrics(model, tokenizer, cfg.pairs, int(cfg.perplexity.batch_size),
                                                autocast))
        return finish(report, folder, out)
    for key, needs in (("labelled", "a classifier (finetune.py stage=classify)"),
                       ("pairs", "a reward model (finetune.py stage=reward)")):
        if cfg.get(key):
            raise UserError(f"{key}= applies to {needs}; {ckpt['path']!r} is a language model (use instructions= "
                            f"or data= for it)")

    ppl = cfg.perplexity
    source, split, fraction, note = lm_data(cfg, ckpt)
    if source is None and records is None:
        raise UserError(note)
    if source is None:  # instructions only: no corpus to score, which a chat or imported model needs not have
        print(f"note: {note}; language-model metrics skipped", file=sys.stderr)
        report["data"] = {"source": None, "split": None, "note": note}
    else:
        tokens = split_tokens(source, tokenizer, split, fraction)
        if ppl.get("max_tokens") is not None:
            tokens = tokens[:int(ppl.max_tokens) + 1]
        log.info("scoring %s tokens of the %s split of %s", f"{len(tokens) - 1:,}", split, source.describe())
        report["data"] = {"source": source.describe(), "split": split}
        report["metrics"].update(language_model_metrics(model, tokens, tokenizer, int(ppl.batch_size),
                                                        ppl.get("stride"), autocast, prefix=split))

    if records is not None:
        gen = cfg.generation
        log.info("answering the %d prompts of %s%s", len(records), cfg.instructions,
                 " in the chat template" if is_chat(tokenizer) else "")
        stop = None if gen.get("stop") is None else list(gen.stop)
        report["metrics"].update(instruction_metrics(model, tokenizer, records, int(gen.max_new_tokens), stop,
                                                     folder / "generations.jsonl"))
        report["files"]["generations"] = "generations.jsonl"

    s = cfg.samples
    if int(s.num) > 0:
        prompt = s.prompt if s.prompt is not None else checkpoint_sample_prompt(ckpt)
        texts = sample_texts(model, tokenizer, str(prompt), int(s.num), int(s.max_new_tokens), float(s.temperature),
                             s.top_k, int(cfg.seed), autocast)
        (folder / "samples.txt").write_text(("\n" + "-" * 40 + "\n").join(texts) + "\n", encoding="utf-8")
        report["files"]["samples"] = "samples.txt"

    return finish(report, folder, out)


def checkpoint_sample_prompt(ckpt: dict) -> str:
    """The checkpoint's stage.sample_prompt when it is a string, else a newline."""
    config = ckpt.get("config")
    stage = config.get("stage") if isinstance(config, dict) else None
    prompt = stage.get("sample_prompt") if isinstance(stage, dict) else None
    return prompt if isinstance(prompt, str) else "\n"


def finish(report: dict, folder: Path, out) -> dict:
    """Write metrics.json and print the report's table."""
    write_json(folder / "metrics.json", report)
    info, data = report["checkpoint"], report["data"]
    if data.get("source") is None:
        scored = f"no corpus scored ({data.get('note')})"
    else:
        scored = f"{'all' if data['split'] == 'all' else data['split'] + ' split'} of {data['source']}"
    out.write(f"\n{info['path']} (step {info['step']}, {info['params']:,} parameters, tokenizer {info['tokenizer']})\n"
              f"data: {scored}\n\n")
    out.write(markdown_table(["metric", "value"], [[k, v] for k, v in report["metrics"].items()]))
    out.write(f"\nrun folder {folder}: metrics.json {' '.join(report['files'].values())}\n")
    out.flush()
    return report


def plot(folder: str, out=sys.stdout) -> list[Path]:
    """evaluate.py plot=<run or sweep folder>: write its plots there, print their paths; keep no evaluation
    run folder (nothing was evaluated)."""
    from gpt.plots import plot_folder

    paths = plot_folder(folder)
    for p in paths:
        out.write(f"{p}\n")
    own = run_dir()
    if own != Path.cwd() and own.is_dir() and _only_setup_files(own):
        logging.shutdown()
        shutil.rmtree(own, ignore_errors=True)
        cwd = Path.cwd().resolve()
        for parent in own.resolve().parents:  # evaluations/<date>/ too, when nothing else is in it
            if parent == cwd or not parent.is_relative_to(cwd) or any(parent.iterdir()):
                break
            parent.rmdir()
    return paths


def main(cfg: DictConfig):
    """evaluate.py: plot=<folder> draws plots; otherwise ckpt=<checkpoint or run folder> is evaluated."""
    if cfg.get("plot"):
        if cfg.get("ckpt"):
            raise UserError("pass either plot=<run or sweep folder> or ckpt=<checkpoint>, not both")
        return plot(cfg.plot)
    return evaluate(cfg)


# ---- comparison across the jobs of a sweep ----------------------------------------------------

def compare(sweep_dir: str | Path) -> tuple[Path, Path, str]:
    """One table across the evaluation jobs of a sweep folder (each job's metrics.json): a row per job,
    a column per metric. Writes comparison.md and comparison.csv there; -> (md path, csv path, markdown)."""
    sweep_dir = Path(sweep_dir)
    jobs = sweep_jobs(sweep_dir, "metrics.json")
    if not jobs:
        raise UserError(f"{sweep_dir} holds no <job>/metrics.json to compare")
    reports = [json.loads((j / "metrics.json").read_text()) for j in jobs]
    columns: list[str] = []
    for r in reports:
        columns += [k for k in r["metrics"] if k not in columns]
    header = ["job", "run", "checkpoint", "step", *columns]
    rows = [[j.name, label, r["checkpoint"]["path"], r["checkpoint"]["step"], *(r["metrics"].get(c) for c in columns)]
            for j, label, r in zip(jobs, job_labels(jobs), reports)]
    text = markdown_table(header, rows)
    md = sweep_dir / "comparison.md"
    md.write_text(text)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    path = sweep_dir / "comparison.csv"
    path.write_text(buf.getvalue())
    return md, path, text


class ComparisonTable(Callback):
    """Hydra callback (conf/evaluate.yaml): after `evaluate.py -m ...`, compare the jobs' metrics."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_jobs(sweep_dir, "metrics.json"):  # e.g. a multirun of plot=...
            return
        md, path, text = compare(sweep_dir)
        print(f"\n{text}\ncomparison: {md} {path}")
