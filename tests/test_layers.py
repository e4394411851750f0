"""The direction of imports (ARCHITECTURE.md, "Layers"): a stage module imports no other stage module
(only gpt.stages.common, their base), and evaluation, inference, serving and the library modules below
the stages import no stage and no trainer; the Objective and Tokenizer protocols hold for what implements
them; stage kind checks compare classes, so a headed GPT subclass is not taken for a language model."""

import ast
from pathlib import Path

import pytest

from gpt.errors import UserError
from gpt.heads import Classifier, RewardModel
from gpt.model import GPT
from gpt.objective import Objective, StageObjective
from gpt.parent import require_kind
from gpt.stages.classify import Classify
from gpt.stages.completion import Completion
from gpt.stages.dpo import DPO
from gpt.stages.grpo import GRPO
from gpt.stages.ppo import PPO
from gpt.stages.pretrain import Pretrain
from gpt.stages.reward import Reward
from gpt.stages.sft import SFT
from gpt.tokenizer import CharTokenizer, TiktokenTokenizer, Tokenizer
from stage_helpers import make_parent, write_jsonl

PACKAGE = Path(__file__).resolve().parents[1] / "gpt"
STAGES = (Pretrain, SFT, Completion, Classify, Reward, DPO, PPO, GRPO)


def imported_modules(path: Path) -> set[str]:
    """Every gpt.* module a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from gpt.stages import sft`
    return {m for m in found if m == "gpt" or m.startswith("gpt.")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_a_stage_module_imports_only_the_stages_base():
    stage_files = [p for p in (PACKAGE / "stages").glob("*.py") if p.stem not in ("__init__", "common")]
    assert len(stage_files) == len(STAGES)
    for path in stage_files:
        stages = {m for m in imported_modules(path) if m.startswith("gpt.stages.") and m != "gpt.stages.common"
                  and m.count(".") == 2}
        assert not stages, f"{module_name(path)} imports the stage module(s) {sorted(stages)}"


@pytest.mark.parametrize("path", sorted(p for p in PACKAGE.rglob("*.py") if "stages" not in p.parts
                                        and p.stem not in ("experiment", "finetuning", "run", "cli")),
                         ids=lambda p: module_name(p))
def test_no_library_module_imports_a_stage_or_the_trainer_for_a_helper(path):
    """Only the run builder (experiment, finetuning, run, cli) composes stages and the trainer."""
    up = {m for m in imported_modules(path) if m.startswith("gpt.stages") or m == "gpt.trainer"}
    assert not up, f"{module_name(path)} imports {sorted(up)}"


@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.__name__)
def test_every_stage_has_the_objective_interface(cls):
    for name in ("train_batch", "batch_tokens", "loss", "evaluate", "samples", "state_dict", "load_state_dict"):
        assert callable(getattr(cls, name, None)), f"{cls.__name__} has no {name}()"
    if cls is not Pretrain:  # fine-tuning stages: also what finetune.py reads
        assert isinstance(cls.name, str) and callable(getattr(cls, "checkpoint_extra", None))


def test_a_constructed_stage_is_a_stage_objective(tmp_path):
    parent = make_parent(tmp_path / "parent.pt")
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "ab", "completion": "ba"}] * 4)
    stage = SFT(parent, str(data), batch_size=2)
    assert isinstance(stage, Objective) and isinstance(stage, StageObjective)
    assert isinstance(stage.tokenizer, Tokenizer)
    assert not isinstance(object(), Objective)


def test_both_tokenizers_have_the_tokenizer_interface():
    assert isinstance(CharTokenizer("ab"), Tokenizer) and isinstance(TiktokenTokenizer("gpt2"), Tokenizer)
    assert not isinstance("ab", Tokenizer)


def ckpt_of(target: str) -> dict:
    return {"path": "p.pt", "stage": "x", "config": {"model": {"_target_": target}}}


def test_kind_checks_compare_classes_not_subclasses_or_strings():
    require_kind(ckpt_of("gpt.model.GPT"), (GPT,), "sft")  # a language model: accepted
    require_kind(ckpt_of("gpt.heads.RewardModel"), (RewardModel,), "ppo", role="stage.reward_ckpt")
    # a Classifier is a GPT subclass, but not a language model a stage fine-tunes
    with pytest.raises(UserError, match=r"ckpt='p.pt' holds a gpt.heads.Classifier \(stage=x\); stage=sft needs "
                                        r"gpt.model.GPT there"):
        require_kind(ckpt_of("gpt.heads.Classifier"), (GPT,), "sft")
    with pytest.raises(UserError, match="holds a os.system .*needs gpt.heads.Classifier or gpt.heads.RewardModel"):
        require_kind(ckpt_of("os.system"), (Classifier, RewardModel), "eval")
