"""lm-eval task files are code: the check a folder of them passes before lm-eval reads it.

lm-eval (0.4.13, lm_eval/tasks/_yaml_loader.py and lm_eval/utils.py) turns a task YAML into code in several ways:
a `!function module.fn` tag imports and runs `module.py` next to the YAML (or any installed module) when the task is
built; its prompt templates (doc_to_text, doc_to_choice, description, ...) are rendered by a Jinja2 Environment
that is not sandboxed, so a template can walk from a string to Python's internals; `dataset_kwargs` may set
`trust_remote_code: true` (datasets < 4 then runs a dataset's loading script); a metric name lm-eval does not know
is fetched with HF evaluate, which runs that metric's script. As gpt/trust.py treats checkpoints, nothing in a task
folder a user was handed may decide which code runs, so `check_task_folder` refuses, in one line naming the file,
the construct and the opt-in:

- a `!function` tag other than the shipped gpt.evaluation.harness.bundled_dataset, and any other YAML tag;
- a `.py` file anywhere in the folder tree (lm-eval imports those by the name a `!function` gives);
- `trust_remote_code` set true, `hf_evaluate: true`, a metric that is not one of lm-eval's own, a dataset_path
  that is a loading script (a .py file, or a folder holding one);
- an `include:` (or a YAML file linked in) that resolves outside the folder, unless it lies in a trusted folder
  (lm-eval's own tasks, this package's);
- template text (inside {{ }} or {% %}) that reaches Python internals: a name or string with `__`, an attribute
  starting with `_`, the `attr` filter, `.format`/`.format_map` (they look attributes up by a name in a string),
  string escapes (\\x, \\u, \\U, \\N, octal: they spell `_` without writing it) and the globals known as gadgets
  (lipsum, cycler, joiner, namespace, self, config, request, url_for, get_flashed_messages).

A scan of the text cannot see a key computed at run time (`doc[key]` with `key` from the data, a name assembled
with `~`, `replace` or `format`); gpt.evaluation.harness therefore also renders the templates of such a run in
Jinja's SandboxedEnvironment (harness.sandboxed_templates). The opt-in (harness.trust_task_code=true,
gpt-lm-eval --trust_task_code) skips both.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import yaml
from jinja2 import Environment
from jinja2.exceptions import TemplateSyntaxError

from gpt.errors import UserError

ALLOWED_FUNCTIONS = frozenset({"gpt.evaluation.harness.bundled_dataset"})  # the shipped task's data reader
GADGETS = frozenset({"lipsum", "cycler", "joiner", "namespace",  # Jinja's default globals: functions whose
                     "self", "config", "request",  # __globals__ reach os; a template's self; Flask's context names
                     "url_for", "get_flashed_messages"})
ATTRIBUTE_LOOKUPS = frozenset({"format", "format_map"})  # '{0.__class__}'.format(x) looks attributes up by name
ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\[xuUN0-7]")  # an odd backslash before x, u, U, N or an octal digit
IGNORED_DIRS = frozenset({"__pycache__", ".ipynb_checkpoints"})  # lm-eval reads no YAML there
_JINJA = Environment()  # only its lexer: templates are tokenized here, never rendered


class Tagged(NamedTuple):
    """A YAML node with a tag (`!function utils.fn`), read as data instead of being run."""

    tag: str
    value: str


class _Loader(yaml.SafeLoader):
    """YAML as lm-eval reads it (its loader is a safe loader plus !function), with every tag kept as a Tagged."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Tagged:
    return Tagged(node.tag, str(node.value) if isinstance(node, yaml.ScalarNode) else "")


_Loader.add_constructor(None, _tagged)  # every tag SafeLoader does not know, !function and !!python/... included


def inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def template_problem(text: str) -> str | None:
    """What in a Jinja template `text` reaches Python internals (see the module docstring), or None."""
    try:
        tokens = [(kind, value) for _, kind, value in _JINJA.lex(text) if kind != "whitespace"]
    except TemplateSyntaxError as e:
        return f"a template Jinja cannot read ({e.message})"
    previous = ("", "")
    for kind, value in tokens:
        after_dot = previous == ("operator", ".")
        if kind == "name":
            if "__" in value or (after_dot and value.startswith("_")):
                return f"the name {value!r} in a template (Python internals)"
            if value == "attr" and previous in (("operator", "|"), ("name", "filter")):
                return "the attr filter in a template (it reaches Python attributes)"
            if after_dot and value in ATTRIBUTE_LOOKUPS:
                return f"the .{value}() method in a template (it looks attributes up by name)"
            if not after_dot and value in GADGETS:
                return f"the global {value!r} in a template (a known route to Python internals)"
        elif kind == "string":
            if ESCAPE.search(value):
                return f"the escape in {value} in a template (it can spell a name the check looks for)"
            if "__" in value:
                return f"the string {value} in a template (Python internals)"
        previous = (kind, value)
    return None


def _dataset_script(value: str) -> bool:
    """Whether dataset_path names a loading script, which datasets before 4.0 runs."""
    path = Path(value).expanduser()
    return path.suffix == ".py" or (path.is_dir() and any(path.glob("*.py")))


class _Check:
    """One scan: refuse(...) raises the one-line UserError of `source` (the setting that named the folder)."""

    def __init__(self, root: Path, source: str, opt_in: str, trusted: list[Path], metrics: Iterable[str] | None):
        self.root, self.source, self.opt_in = root, source, opt_in
        self.trusted, self.metrics = trusted, None if metrics is None else set(metrics)
        self.seen: set[Path] = set()
        self.visited: set[int] = set()  # dicts and lists already checked: YAML aliases share them (a few hundred
        # bytes of nested aliases would otherwise stand for billions of nodes)
        self.open: set[int] = set()  # those being checked now: meeting one again means it contains itself
        self.kept: list = []  # the checked objects stay alive, so that no later object reuses their id()

    def refuse(self, file: Path, what: str):
        raise UserError(f"{self.source}: {file}: {what}; task files are code: {self.opt_in} runs them unchecked "
                        f"(only for a folder whose author you trust)")

    def file(self, path: Path, named_by: Path | None = None, as_written: str = "") -> None:
        """Check one YAML file (named_by: the file whose include: named it as_written)."""
        try:
            real = path.resolve()
        except (OSError, ValueError) as e:  # a name with a NUL byte, a loop of links
            self.refuse(named_by or path, f"{as_written or path!s:.200} is not a usable file name ({e})")
        if real in self.seen or any(inside(real, t) for t in self.trusted):
            return
        self.seen.add(real)
        if not inside(real, self.root):
            what = f"include: {as_written} ({real})" if named_by else f"links to {real}"
            self.refuse(named_by or path, f"{what} is outside {self.root} (copy it into the folder)")
        try:
            data = yaml.load(real.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506  a safe loader
        except (OSError, UnicodeError, yaml.YAMLError) as e:
            self.refuse(path, f"cannot be read as YAML ({(str(e).splitlines() or [type(e).__name__])[0]})")
        except RecursionError:
            self.refuse(path, "is nested too deeply to be read as YAML")
        try:
            self.node(data, path, "")
        except RecursionError:
            self.refuse(path, "is nested too deeply to be checked")

    def node(self, value, path: Path, where: str) -> None:
        at = f" at {where}" if where else ""
        if isinstance(value, Tagged):
            if value.tag != "!function":
                self.refuse(path, f"the YAML tag {value.tag} {value.value}{at} (only !function is lm-eval's; a "
                                  f"loader without libyaml builds Python objects from python/ tags)")
            if value.value not in ALLOWED_FUNCTIONS:
                self.refuse(path, f"!function {value.value}{at} runs Python code")
            # lm-eval imports <folder of the YAML>/gpt/evaluation/harness.py first, if there is one
            shadow = path.resolve().parent / (value.value.rpartition(".")[0].replace(".", "/") + ".py")
            if shadow.exists():
                self.refuse(path, f"!function {value.value}{at} would run {shadow}")
        elif isinstance(value, (dict, list)):
            if id(value) in self.open:
                self.refuse(path, f"an alias{at} contains itself")
            if id(value) in self.visited:
                return  # the same object through another alias: checked once
            self.visited.add(id(value))
            self.kept.append(value)
            self.open.add(id(value))
            if isinstance(value, dict):
                for key, item in value.items():
                    self.node(key, path, where)
                    self.entry(str(key), item, path, f"{where}.{key}" if where else str(key))
            else:
                for n, item in enumerate(value):
                    self.node(item, path, f"{where}[{n}]")
            self.open.discard(id(value))
        elif isinstance(value, str) and ("{{" in value or "{%" in value):
            problem = template_problem(value)
            if problem:
                self.refuse(path, f"{problem}{at}")

    def entry(self, key: str, value, path: Path, where: str) -> None:
        if key == "trust_remote_code" and value not in (False, None):
            self.refuse(path, f"{where}: {value} lets datasets run a dataset's own code")
        if key == "hf_evaluate" and value is True:
            self.refuse(path, f"{where}: true loads a metric script with HF evaluate")
        if key == "metric" and isinstance(value, str) and self.metrics is not None and value not in self.metrics:
            self.refuse(path, f"{where}: {value!r} is not one of lm-eval's metrics (HF evaluate would load and run a "
                              f"script of that name; lm-eval's: {', '.join(sorted(self.metrics))})")
        if key == "dataset_path" and isinstance(value, str) and _dataset_script(value):
            self.refuse(path, f"{where}: {value!r} is a dataset loading script (Python code)")
        if key == "include":
            for name in value if isinstance(value, list) else [value]:
                if not isinstance(name, str):
                    self.refuse(path, f"{where}: {name!r} is not a file name")
                target = Path(name).expanduser()
                self.file(target if target.is_absolute() else path.resolve().parent / target, path, name)
        self.node(value, path, where)


def check_task_folder(folder: str | Path, *, source: str, opt_in: str, trusted: Iterable[Path] = (),
                      metrics: Iterable[str] | None = None) -> None:
    """Refuse (UserError, one line) a folder of lm-eval task YAMLs, or one task YAML, that holds code (the module
    docstring lists what counts). source: the setting that named it (harness.include_path); opt_in: how to run it
    anyway; trusted: folders whose files are not checked (lm-eval's own tasks, the shipped ones); metrics: the metric
    names lm-eval knows (None: not checked)."""
    trusted = [Path(t).resolve() for t in trusted]
    given = Path(folder).expanduser()
    real = given.resolve()
    if any(inside(real, t) for t in trusted):
        return
    if real.is_file():  # a single task file: includes stay next to it
        _Check(real.parent, source, opt_in, trusted, metrics).file(given)
        return
    check = _Check(real, source, opt_in, trusted, metrics)
    for code in sorted(real.rglob("*.py")):
        check.refuse(code, "a Python file in the task folder (a task's !function imports it)")
    for path in sorted(real.rglob("*.yaml")):
        if not IGNORED_DIRS & set(path.relative_to(real).parts):
            check.file(path)
