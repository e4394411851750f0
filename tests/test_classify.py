"""Classification: pooled at the last real token, accuracy rising, labels and head through a checkpoint."""

import pytest
import torch

from gpt.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from gpt.errors import UserError
from gpt.heads import Classifier
from gpt.parent import model_config
from gpt.scoring import label_probabilities
from gpt.stages.classify import Classify
from stage_helpers import make_parent, write_jsonl


def rows(n):
    return [{"text": f"{a}+{b}={'yes' if (a + b) % 2 else 'no'}", "label": "odd" if (a + b) % 2 else "even"}
            for a in range(n) for b in range(n)]


def test_classifier_learns_and_roundtrips_with_its_labels(tmp_path):
    parent = make_parent(tmp_path / "p.pt")
    data = write_jsonl(tmp_path / "c.jsonl", rows(6))
    stage = Classify(parent, str(data), batch_size=8)
    assert stage.labels == ["even", "odd"] and stage.model.head.out_features == 2
    ctx = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    opt = torch.optim.AdamW(stage.model.parameters(), lr=3e-3)
    before = stage.evaluate(stage.model, 4, ctx)
    for _ in range(40):
        loss, _ = stage.loss(stage.model, stage.train_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = stage.evaluate(stage.model, 4, ctx)
    assert after["val/loss"] < before["val/loss"] and after["val/accuracy"] == 1.0
    path = save_checkpoint({"model": stage.model.state_dict(), "step": 1, "tokenizer": stage.tokenizer.identity(),
                            "config": {"model": model_config(stage.model)}, **stage.checkpoint_extra()},
                           tmp_path / "c.pt")
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt)
    assert type(model) is Classifier and ckpt["labels"] == ["even", "odd"]
    p = label_probabilities(model, stage.tokenizer, "2+3=yes")
    assert p.shape == (2,) and p[1] > 0.5 and abs(float(p.sum()) - 1) < 1e-6


def test_padding_does_not_change_the_pooled_logits(tmp_path):
    torch.manual_seed(0)
    model = Classifier(num_labels=3, vocab_size=10, block_size=16, n_layer=1, n_head=2, n_embd=16).eval()
    idx = torch.tensor([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]])
    both = model.classify(idx, torch.tensor([3, 5]))
    alone = model.classify(idx[:1, :3], torch.tensor([3]))
    assert torch.allclose(both[0], alone[0], atol=1e-5)


def test_classify_refuses_unseen_val_labels_and_one_label(tmp_path):
    parent = make_parent(tmp_path / "p.pt")
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "1", "label": "a"}, {"text": "2", "label": "b"}])
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": "3", "label": "c"}])
    with pytest.raises(UserError, match=r"validation labels \['c'\] never occur"):
        Classify(parent, str(train), val_data=str(val))
    one = write_jsonl(tmp_path / "o.jsonl", [{"text": "1", "label": "a"}, {"text": "2", "label": "a"}])
    with pytest.raises(UserError, match="at least two"):
        Classify(parent, str(one), val_data=str(one))
    bad = write_jsonl(tmp_path / "b.jsonl", [{"text": "1", "label": "a"}, {"text": "2", "label": [1]}])
    with pytest.raises(UserError, match=r"b\.jsonl:2: 'label' must be"):
        Classify(parent, str(bad))


@pytest.mark.parametrize("tie", [True, False])
def test_an_untied_output_layer_the_loss_never_reads_is_frozen(tmp_path, tie):
    """Every trainable parameter must get a gradient in each backward under DDP (else it stops at the next step):
    a classifier (and a reward model without lm_weight: tests/test_reward.py) freezes an untied lm_head it never
    reads; tied, it is the embedding, which trains. After a backward every trainable parameter has a gradient."""
    parent = make_parent(tmp_path / "p.pt", tie_embeddings=tie)
    stage = Classify(parent, str(write_jsonl(tmp_path / "c.jsonl", rows(4))), batch_size=4)
    assert stage.model.lm_head.weight.requires_grad is tie
    loss, _ = stage.loss(stage.model, stage.train_batch())
    loss.backward()
    assert all(p.grad is not None for p in stage.model.parameters() if p.requires_grad)


def test_a_head_call_runs_the_head_and_leaves_a_compiled_forward_in_place():
    """gpt.parallel.call runs a head's method as the forward of the (DDP/FSDP/compiled) model for one call; a
    torch.compile'd model keeps its compiled forward afterwards (the call used to delete it)."""
    from gpt.parallel import call

    torch.manual_seed(0)
    model = Classifier(num_labels=2, vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)
    idx, lengths = torch.randint(0, 11, (2, 8)), torch.tensor([8, 5])
    compiled = torch.compile(model, backend="eager")
    own = compiled.__dict__.get("forward")
    assert torch.equal(call(compiled, Classifier.classify, idx, lengths), model.classify(idx, lengths))
    assert compiled.__dict__.get("forward") is own
    assert torch.equal(call(model, Classifier.classify, idx, lengths), model.classify(idx, lengths))
    assert "forward" not in model.__dict__  # a plain model: nothing left behind
