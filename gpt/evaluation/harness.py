"""EleutherAI's lm-evaluation-harness on this package's checkpoints: an lm-eval model class, registered as
"gpt-pipeline", and the glue that runs it for evaluate.py.

lm-eval (0.4.x) finds models in its own registry only (no entry points, no plugin option on its CLI), so this
module registers the class when it is imported and then runs lm-eval's CLI unchanged:

    python -m gpt.evaluation.harness --model gpt-pipeline --model_args ckpt=<run>[,dtype=float32,batch_size=16] \
        --tasks shakespeare_word_order [--include_path <folder of task YAMLs>]    (console script: gpt-lm-eval)
    python evaluate.py ckpt=<run> harness.tasks=[shakespeare_word_order]          (metrics into metrics.json)

From Python, `import gpt.evaluation.harness` registers the model; then lm_eval.simple_evaluate(model=
"gpt-pipeline", model_args="ckpt=...") works, or pass a `PipelineLM` yourself.

The requests lm-eval makes map onto our pieces: loglikelihood scores (context, continuation) token pairs in
right-padded batches (a context longer than block_size loses its oldest tokens, as lm-eval's HFLM does; a
continuation longer than block_size, which HFLM refuses, is scored in runs of block_size targets);
loglikelihood_rolling scores a whole text in lm-eval's disjoint rolling windows; generate_until decodes on the
KV-cache DecodeEngine (rows join as others finish; until-strings are stop strings, end-of-text and a chat
model's <|end|> stop tokens). Tasks run with --apply_chat_template get gpt.chat's template (chat models only).

A folder of task files from elsewhere is code (its !function tags, its templates): harness.include_path and the
wrapper's --include_path/--tasks <file or folder> are checked by gpt.evaluation.task_trust before lm-eval reads
them, and their templates render sandboxed, unless harness.trust_task_code=true (gpt-lm-eval --trust_task_code).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import re
import sys
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import lm_eval.api.metrics  # noqa: F401  fills metric_registry (the metric names a task file may use)
import lm_eval.models  # noqa: F401  lm-eval's own models: its get_model imports them only while the registry is empty
import lm_eval.tasks._yaml_loader  # noqa: F401  the task loader whose rules gpt.evaluation.task_trust follows
import lm_eval.utils
import torch
import torch.nn.functional as F
import yaml
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import metric_registry, model_registry, register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from packaging.specifiers import SpecifierSet

from gpt.chat import END, SPECIAL, answer_stop_ids
from gpt.engine import DecodeEngine, Sampling, text_stop
from gpt.errors import UserError, exit_code
from gpt.evaluation.generation import cut_at_stop, is_chat
from gpt.evaluation.task_trust import check_task_folder, inside
from gpt.inference import load_for_inference

log = logging.getLogger("gpt")

# The tested range (pyproject's eval extra): another version may read task files by other rules than the ones
# task_trust checks, so it is refused here (gpt.evaluation.load_harness turns this into one line).
LM_EVAL = "lm-eval>=0.4.13,<0.5"
if not SpecifierSet(LM_EVAL.removeprefix("lm-eval")).contains(version("lm_eval"), prereleases=True):
    raise ImportError(f"lm-eval {version('lm_eval')} is outside {LM_EVAL}", name="lm_eval")

TASKS = Path(__file__).resolve().parent / "tasks"  # the example tasks shipped with the package
MODEL_ARGS = ("ckpt", "dtype", "batch_size", "device", "max_gen_toks", "max_batch_size")


def _batch_size(value) -> int:
    text = str(value)
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"batch_size={value!r} must be a positive integer (batch_size=auto is not supported)")
    return int(text)


class PipelineLM(TemplateLM):
    """A checkpoint of this package as an lm-eval model.

    model_args: ckpt=<run folder or .pt> (best.pt preferred), dtype=float32|bfloat16|float16|auto (float32:
    the exact model), batch_size=N (rows per forward and decode rows at once), device=cpu|cuda[:i] (default:
    cuda where available), max_gen_toks=N (generate_until's limit when a task sets none).
    """

    def __init__(self, ckpt: str | None = None, dtype: str = "float32", batch_size: int | str = 16,
                 device: str | None = None, max_gen_toks: int = 256, max_batch_size: int | None = None, **unknown):
        super().__init__()
        if unknown:
            raise UserError(f"gpt-pipeline model_args: unknown {', '.join(sorted(unknown))}; accepted: "
                            f"{', '.join(MODEL_ARGS)} (e.g. --model_args ckpt=<run folder>,dtype=float32)")
        if not ckpt:
            raise UserError("gpt-pipeline needs a checkpoint: --model_args ckpt=<run folder or .pt file>")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer, _ = load_for_inference(str(ckpt), str(device), None, str(dtype))
        self._setup(model, tokenizer, _batch_size(batch_size), max_gen_toks)

    @classmethod
    def from_model(cls, model, tokenizer, batch_size: int = 16, max_gen_toks: int = 256) -> PipelineLM:
        """Wrap a model already loaded (evaluate.py's, in the dtype it chose)."""
        lm = cls.__new__(cls)
        TemplateLM.__init__(lm)
        lm._setup(model, tokenizer, _batch_size(batch_size), max_gen_toks)
        return lm

    def _setup(self, model, tokenizer, batch_size: int, max_gen_toks) -> None:
        if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) or max_gen_toks < 1:
            raise UserError(f"max_gen_toks={max_gen_toks!r} must be a positive integer")
        self.model, self.tok = model.eval(), tokenizer
        self.batch_size, self._max_gen_toks = batch_size, max_gen_toks
        self.block = model.config.block_size
        self._device = model.transformer.wte.weight.device
        self.chat = is_chat(tokenizer)
        specials = {t: tokenizer.special_id(t) for t in tokenizer.special}
        if tokenizer.eot_id is not None:  # a tiktoken encoding's own <|endoftext|>
            specials.setdefault(tokenizer.decode([tokenizer.eot_id]), tokenizer.eot_id)
        self._specials = specials
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")") \
            if specials else None
        self.stop_ids = answer_stop_ids(tokenizer, self.chat)  # a chat answer: <|end|>, or a new turn

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> PipelineLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> PipelineLM:
        # lm-eval's CLI always passes its own batch_size (default 1); a value in --model_args wins over it
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            log.warning("device=%s: CUDA is not available here; running on the CPU", extra.pop("device"))
        return cls(**{**extra, **arg_dict})  # (its --device default is cuda:0, even on a machine without one)

    # ------------------------------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id if self.tok.eot_id is not None else self.prefix_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context conditions on: <|bos|> (a stage=completion model), else end-of-text (as HFLM
        does for GPT-2), else a newline (a char model without either)."""
        if self.tok.bos_id is not None:
            return self.tok.bos_id
        return self.tok.eot_id if self.tok.eot_id is not None else self.tok.encode("\n")[0]

    @property
    def max_length(self) -> int:
        return self.block

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        """Names the vocabulary (lm-eval keys its request cache on it): two char vocabularies differ."""
        identity = json.dumps(self.tok.identity(), sort_keys=True)
        return f"gpt-pipeline-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Text -> ids. Special-token names in the text become those tokens (as a Hugging Face tokenizer does:
        a chat-templated prompt arrives as text); a model trained with <|bos|> gets it in front unless
        add_special_tokens=False."""
        pieces = self._split.split(string) if self._split is not None else [string]
        ids: list[int] = []
        for piece in pieces:
            if piece in self._specials:
                ids.append(self._specials[piece])
            elif piece:
                ids += self.tok.encode(piece)
        bos = self.tok.bos_id
        if bos is not None and add_special_tokens is not False and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    # ------------------------------------------------------------------------------------------ scoring

    @torch.no_grad()
    def _score(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """rows of (input ids, continuation ids), the continuation being the last len(cont) targets of the
        input shifted by one -> (sum of the continuation's log-probabilities, whether greedy decoding gives it).

        The batch is right-padded (B, T): causal attention keeps padding out of every real position. Only the
        continuation positions go through the output layer ((sum of lengths, V), not (B, T, V))."""
        width = max(len(inp) for inp, _ in rows)
        x = torch.zeros(len(rows), width, dtype=torch.long)
        for b, (inp, _) in enumerate(rows):
            x[b, :len(inp)] = torch.tensor(inp)
        h = self.model.hidden_states(x.to(self.device))  # (B, T, C)
        picked = torch.cat([h[b, len(inp) - len(cont):len(inp)] for b, (inp, cont) in enumerate(rows)])
        logp = F.log_softmax(self.model.lm_head(picked).float(), dim=-1)  # (N, V)
        targets = torch.tensor([t for _, cont in rows for t in cont], device=logp.device)
        token_logp = logp.gather(-1, targets[:, None]).squeeze(-1)
        greedy = logp.argmax(-1) == targets
        out, at = [], 0
        for _, cont in rows:
            n = len(cont)
            out.append((float(token_logp[at:at + n].sum()), bool(greedy[at:at + n].all())))
            at += n
        return out

    def _pieces(self, context: list[int], continuation: list[int]) -> list[tuple[list[int], list[int]]]:
        """The model's inputs for scoring continuation after context -> [(input ids, the continuation ids it
        predicts: its last ones)]. Each input is the last block_size tokens before its last target: older context
        is cut, as HFLM cuts it. A continuation longer than block_size (which HFLM refuses) is scored in pieces
        of block_size targets, each with as much context as fits, as loglikelihood_rolling scores a text."""
        seq, out = context + continuation, []
        for start in range(len(context), len(seq), self.block):
            end = min(start + self.block, len(seq))
            out.append((seq[max(0, end - 1 - self.block):end - 1], seq[start:end]))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None
                              ) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) -> (log-prob, greedy),
        in batches of batch_size model inputs of similar length (longest first)."""
        pieces = [(n, piece) for n, (_, ctx, cont) in enumerate(requests) for piece in self._pieces(ctx, cont)]
        pieces.sort(key=lambda p: -len(p[1][0]))
        size = override_bs or self.batch_size
        logp, greedy = [0.0] * len(requests), [True] * len(requests)
        for first in range(0, len(pieces), size):
            chunk = pieces[first:first + size]
            for (n, _), (lp, gr) in zip(chunk, self._score([piece for _, piece in chunk])):
                logp[n] += lp
                greedy[n] = greedy[n] and gr
        out = list(zip(logp, greedy))
        for req, score in zip(requests, out):
            if req[0] is not None:
                self.cache_hook.add_partial("loglikelihood", req[0], score)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text: lm-eval's rolling windows of block_size tokens (every token
        predicted once, the first after prefix_token_id), all texts' windows batched together."""
        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            ids = self.tok_encode(text, add_special_tokens=False)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=self.block, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[n] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------------------------------ generation

    def _sampling(self, kwargs: dict) -> tuple[Sampling, list[str]]:
        """A task's generation_kwargs -> (the row's Sampling, its until-strings). Greedy unless do_sample."""
        kwargs = dict(kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_tokens = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
        top_k, top_p = kwargs.pop("top_k", None), kwargs.pop("top_p", None)
        if kwargs:
            log.warning("generate_until: ignoring generation_kwargs %s (not sampling settings of this model)",
                        sorted(kwargs))
        sampling = Sampling(max_tokens, temperature if sample else 0.0, top_k, top_p, stop_ids=self.stop_ids,
                            stop=text_stop(self.tok.decode, until) if until else None)
        return sampling, until

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Decode every request on one DecodeEngine of batch_size rows: each request is a row of its own that
        joins when a slot is free and leaves at its first until-string, a stop token or max_gen_toks; its text
        is cut before the until-string. Contexts keep their last block_size tokens (the engine's window)."""
        engine = DecodeEngine(self.model, max(1, min(self.batch_size, len(requests))))
        rows, results = [], [""] * len(requests)
        for n, req in enumerate(requests):
            context, kwargs = req.args
            sampling, until = self._sampling(kwargs)
            if sampling.max_tokens < 1:
                continue
            ids = self.tok_encode(context)[-self.block:] or [self.prefix_token_id]
            rows.append((n, until, engine.add([ids], sampling)[0]))
        while not engine.idle:
            engine.step()
        for n, until, row in rows:
            if row.error is not None:
                raise row.error
            results[n] = cut_at_stop(self.tok.decode(row.new), until)
        for req, text in zip(requests, results):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return results

    # ------------------------------------------------------------------------------------------ chat

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """gpt.chat's template as text (tok_encode turns its token names back into the tokens): each message
        <|role|>content<|end|>, then <|assistant|>; without add_generation_prompt a last assistant message is
        left open for its continuation (as HFLM's continue_final_message)."""
        if not self.chat:
            raise UserError("--apply_chat_template needs a chat model (finetune.py stage=sft); this checkpoint has "
                            "no chat template tokens: drop --apply_chat_template")
        parts = []
        for i, m in enumerate(chat_history):
            role = m.get("role")
            if f"<|{role}|>" not in SPECIAL:
                raise UserError(f"chat message role {role!r}: the chat template has system, user and assistant")
            open_end = not add_generation_prompt and i == len(chat_history) - 1 and role == "assistant"
            parts.append(f"<|{role}|>{m['content']}" + ("" if open_end else END))
        if add_generation_prompt:
            parts.append("<|assistant|>")
        return "".join(parts)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        from gpt.export_meta import CHAT_TEMPLATE

        return CHAT_TEMPLATE if self.chat and chat_template else None


# By name first: `python -m gpt.evaluation.harness` runs this file as __main__, and lm-eval then imports it as
# gpt.evaluation.harness; both register this same entry (two class objects under one name would be refused), and
# a process that imported the module before running it as __main__ already has the class registered.
if "gpt-pipeline" not in model_registry:
    model_registry.register("gpt-pipeline", target="gpt.evaluation.harness:PipelineLM")
if __name__ == "gpt.evaluation.harness":
    register_model("gpt-pipeline")(PipelineLM)


# ---------------------------------------------------------------------------------------------- tasks

def bundled_dataset(data_files: dict | None = None, **metadata):
    """custom_dataset of the tasks in gpt/evaluation/tasks: datasets' json builder over their JSONL files, named
    relative to that folder (lm-eval would resolve dataset_kwargs.data_files against the working directory).
    metadata: the task's metadata and --metadata values, which lm-eval passes too (unused)."""
    import datasets

    if not isinstance(data_files, dict) or not data_files:
        raise UserError(f"bundled_dataset: dataset_kwargs.data_files={data_files!r} must map splits to files")
    return datasets.load_dataset("json", data_files={split: str(TASKS / name) for split, name in data_files.items()})


def trusted_task_folders() -> list[Path]:
    """Folders whose task files run unchecked: lm-eval's own tasks (its package) and the ones shipped here."""
    return [Path(lm_eval.tasks.__file__).resolve().parent, TASKS]


def check_tasks(path: str | Path, source: str, opt_in: str) -> None:
    """gpt.evaluation.task_trust.check_task_folder with lm-eval's trusted folders and metric names."""
    check_task_folder(path, source=source, opt_in=opt_in, trusted=trusted_task_folders(), metrics=metric_registry)


@contextmanager
def sandboxed_templates(on: bool = True):
    """While open (when `on`), lm-eval renders task templates in Jinja's SandboxedEnvironment (same settings and
    filters as its own lm_eval.utils.env): a key computed at run time, which no scan of a file can see, cannot reach
    Python internals either. A template that tries becomes a UserError."""
    plain = lm_eval.utils.env
    if not on:
        yield
        return
    sandbox = SandboxedEnvironment(loader=plain.loader, undefined=plain.undefined,
                                   keep_trailing_newline=plain.keep_trailing_newline)
    sandbox.filters.update(plain.filters)
    lm_eval.utils.env = sandbox  # apply_template reads this module attribute on every call
    try:
        yield
    except SecurityError as e:
        raise UserError(f"a task template reached for Python internals ({e}); task files are code: "
                        f"harness.trust_task_code=true (gpt-lm-eval: --trust_task_code) renders them unsandboxed "
                        f"(only for tasks whose author you trust)") from None
    finally:
        lm_eval.utils.env = plain


def task_manager(tasks: list[str], include_path: str | list[str] | None = None, trust_task_code: bool = False):
    """An lm-eval TaskManager that knows the shipped tasks, include_path's, and (only when a task is not among
    those: indexing them takes ~8 s) lm-eval's own. An unknown task name is a UserError; so is an include_path
    holding code (gpt.evaluation.task_trust) unless trust_task_code."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS)] + ([] if include_path is None else
                            [include_path] if isinstance(include_path, str) else list(include_path))
    for p in paths[1:]:
        if not Path(p).expanduser().exists():
            raise UserError(f"harness.include_path={p!r} does not exist; pass a folder of lm-eval task YAML files")
        if not trust_task_code:
            check_tasks(p, "harness.include_path", "harness.trust_task_code=true")
    manager = TaskManager(include_path=paths, include_defaults=False)
    if not all(t in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"harness.tasks: lm-eval knows no task {', '.join(map(repr, unknown))}; list them with "
                        f"`python -m gpt.evaluation.harness ls tasks` (add harness.include_path=<folder> for your own)")
    return manager


def flat_metrics(results: dict) -> dict:
    """lm-eval's results {"task": {"acc,none": 0.5, "acc_stderr,none": 0.03, "alias": ...}} -> evaluate.py's flat
    metrics {"harness/task/acc": 0.5, "harness/task/acc_stderr": 0.03}; a filter other than "none" stays in the
    name (harness/task/exact_match/strict-match). Text and N/A values are left out."""
    out = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not filt:
                continue
            out[f"harness/{task}/{metric}" + ("" if filt == "none" else f"/{filt}")] = value
    return out


def run_tasks(model, tokenizer, tasks: list[str], include_path=None, limit: int | None = None,
              num_fewshot: int | None = None, batch_size: int = 16, apply_chat_template: bool = False,
              log_samples: bool = False, trust_task_code: bool = False) -> dict:
    """lm_eval.simple_evaluate of `tasks` on a loaded model -> lm-eval's results dict. An include_path is checked
    and its templates rendered sandboxed unless trust_task_code."""
    from lm_eval import simple_evaluate

    lm = PipelineLM.from_model(model, tokenizer, batch_size)
    if apply_chat_template and not lm.chat:  # before any task is built
        raise UserError("harness.apply_chat_template=true needs a chat model (finetune.py stage=sft); this "
                        "checkpoint has no chat template tokens")
    manager = task_manager(list(tasks), include_path, trust_task_code)
    with sandboxed_templates(on=bool(include_path) and not trust_task_code):
        return simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                               num_fewshot=num_fewshot, apply_chat_template=apply_chat_template,
                               log_samples=log_samples)


def harness_metrics(model, tokenizer, cfg, folder: Path) -> dict:
    """evaluate.py's harness.* settings (conf/evaluate.yaml): run the tasks, write lm-eval's results to
    harness.json in the evaluation folder -> flat metrics for metrics.json."""
    include = cfg.get("include_path")
    include = None if include is None else ([str(include)] if isinstance(include, str) else [str(p) for p in include])
    log.info("lm-eval tasks %s", ", ".join(cfg.tasks))
    results = run_tasks(model, tokenizer, [str(t) for t in cfg.tasks], include, cfg.get("limit"),
                        cfg.get("num_fewshot"), int(cfg.batch_size), bool(cfg.get("apply_chat_template")),
                        trust_task_code=bool(cfg.get("trust_task_code")))
    keep = {k: results.get(k) for k in ("results", "groups", "versions", "n-shot", "higher_is_better", "n-samples")}
    (folder / "harness.json").write_text(json.dumps(keep, indent=2, default=str))
    return flat_metrics(results["results"])


def _names_include_path(arg: str) -> bool:
    """--include_path, =value or not, or an abbreviation of it (lm-eval's parser takes --inc)."""
    option = arg.split("=")[0]
    return len(option) > 2 and "--include_path".startswith(option)


def with_shipped_tasks(args: list[str]) -> list[str]:
    """lm-eval's arguments plus --include_path <the shipped tasks> when they name no folder of their own (lm-eval
    takes one), so that `--tasks shakespeare_word_order` works as it is."""
    if not args or args[0] in ("-h", "--help") or any(_names_include_path(a) for a in args):
        return args
    if any(a.startswith("--conf") for a in args):  # lm-eval's parser takes abbreviations of --config
        try:  # a --config file's include_path: an --include_path added here would replace it (the command line wins)
            if any(option.startswith("--config") and option.endswith("include_path") and path
                   for option, path in user_task_files(args)):
                return args
        except SystemExit:  # arguments lm-eval's parser refuses: it says so itself when it runs
            return args
    return [*args, "--include_path", str(TASKS)]


def user_task_files(args: list[str]) -> list[tuple[str, str]]:
    """The task folders and files lm-eval's command line `args` would read besides its own tasks -> [(the option
    that names it, path)]: --include_path, --tasks entries that are YAML files (globs too) or one folder, and the
    same keys of a --config file. Read by lm-eval's own parser (it takes abbreviations such as --inc)."""
    from lm_eval._cli import HarnessCLI

    saved = sys.argv
    sys.argv = [saved[0], *args]
    try:
        parsed = vars(HarnessCLI().parse_args())
    finally:
        sys.argv = saved
    found = [("--include_path", parsed.get("include_path")), ("--tasks", parsed.get("tasks"))]
    config = parsed.get("config")
    if config and Path(config).is_file():
        settings = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
        if isinstance(settings, dict):
            found += [(f"--config {config}: {key}", settings.get(key)) for key in ("include_path", "tasks")]
    out = []
    for option, value in found:
        values = [value] if isinstance(value, str) else list(value or [])
        if option.endswith("include_path"):
            out += [(option, str(v)) for v in values]
            continue
        names = [n for v in values for n in str(v).split(",") if n]
        for name in names:  # as lm-eval's EvaluatorConfig.process_tasks reads them
            if name.endswith(".yaml"):
                out += [(option, f) for f in sorted(glob.glob(str(Path(name).absolute())))]
            elif len(names) == 1 and Path(name).is_dir():
                out.append((option, name))
    return out


def main(argv: list[str] | None = None) -> int:
    """lm-eval's own command line, with gpt-pipeline registered (this module's import did it) and the shipped
    tasks' folder as --include_path unless one is given. Task folders and files it names are checked
    (gpt.evaluation.task_trust) and their templates rendered sandboxed, unless --trust_task_code (ours: it is
    taken out before lm-eval sees the arguments)."""
    from lm_eval.__main__ import cli_evaluate

    args = sys.argv[1:] if argv is None else list(argv)
    trust = "--trust_task_code" in args
    args = with_shipped_tasks([a for a in args if a != "--trust_task_code"])
    sys.argv = [sys.argv[0], *args]

    def run() -> None:
        named = [] if trust or not args or args[0] in ("-h", "--help") else user_task_files(args)
        own = [(o, p) for o, p in named if not any(inside(Path(p).resolve(), t) for t in trusted_task_folders())]
        for option, path in own:
            check_tasks(path, f"{option} {path}", "--trust_task_code")
        with sandboxed_templates(on=bool(own) and not trust):
            cli_evaluate()

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
