"""Text metrics of answers against references: exact match, corpus BLEU (sacrebleu) and ROUGE F1
(rouge-score), with tokenizers that score Chinese and Japanese text (written without spaces) per character."""

from __future__ import annotations

import re

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
