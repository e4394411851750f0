"""The offline arithmetic task: files in every stage's format, disjoint splits, exact-match reward."""

from gpt.jsonl import read_instructions, read_labelled, read_pairs, read_prompts
from gpt.tasks.arithmetic import exact_match_reward, main, make_splits, wrong_answer


def test_task_files_parse_with_the_stage_readers(tmp_path, capsys):
    main([str(tmp_path), "--n", "200", "--seed", "3"])
    assert "sft_train" in capsys.readouterr().out
    sft = read_instructions(tmp_path / "sft_train.jsonl")
    val = read_instructions(tmp_path / "sft_val.jsonl")
    assert len(sft) + len(val) == 200 and len(val) == 20
    assert not {c[0]["content"] for c in sft} & {c[0]["content"] for c in val}  # held-out questions
    for conv in sft:
        q, a = conv[0]["content"], conv[1]["content"]
        assert eval(q[:-1]) == int(a)
    for p in read_pairs(tmp_path / "pairs_train.jsonl"):
        assert eval(p["prompt"][:-1]) == int(p["chosen"]) != int(p["rejected"])
    labels = read_labelled(tmp_path / "classify_train.jsonl")
    assert {lab for _, lab in labels} == {"correct", "wrong"}
    for text, lab in labels:
        q, a = text.split("=")
        assert (eval(q) == int(a)) == (lab == "correct")
    assert all(p["answer"] for p in read_prompts(tmp_path / "prompts_val.jsonl"))
    assert (tmp_path / "pretrain.txt").read_text().count("\n") == 4 * len(sft)


def test_splits_are_seeded_and_reward_is_exact_match():
    assert make_splits(50, seed=1) == make_splits(50, seed=1)
    import random

    rng = random.Random(0)
    assert all(wrong_answer(a, rng) != a and int(wrong_answer(a, rng)) >= 0 for a in ("0", "5", "42", "198"))
    assert exact_match_reward(" 42 ", "42") == 1.0 and exact_match_reward("421", "42") == 0.0


def test_wrong_answers_mix_near_and_far_misses_and_pretraining_text_repeats(tmp_path):
    import random

    rng = random.Random(1)
    gaps = [abs(int(wrong_answer("50", rng, far=0.5, hi=99)) - 50) for _ in range(400)]
    near, far = [g for g in gaps if g <= 10], [g for g in gaps if g > 10]
    assert set(near) <= {1, 2, 10} and 150 < len(far) < 250 and max(far) <= 148
    assert all(abs(int(wrong_answer("7", rng)) - 7) in (1, 2, 10) for _ in range(50))  # far=0: near misses only
    main([str(tmp_path), "--n", "100", "--max", "20", "--far", "1.0", "--repeat", "2"])
    pairs = read_pairs(tmp_path / "pairs_train.jsonl")
    assert all(abs(int(p["chosen"]) - int(p["rejected"])) > 10 for p in pairs)
    lines = (tmp_path / "pretrain.txt").read_text().splitlines()
    assert len(lines) == 2 * len(pairs) and sorted(lines[: len(pairs)]) == sorted(lines[len(pairs):])


def test_val_fraction_sets_the_held_out_share(tmp_path):
    import pytest

    main([str(tmp_path), "--n", "200", "--val-fraction", "0.3"])
    assert len(read_instructions(tmp_path / "sft_val.jsonl")) == 60
    assert len(read_instructions(tmp_path / "sft_train.jsonl")) == 140
    with pytest.raises(SystemExit):
        main([str(tmp_path / "x"), "--val-fraction", "1.5"])


def test_make_splits_refuses_a_val_fraction_that_empties_a_split():
    import pytest

    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="val_fraction"):
            make_splits(50, val_fraction=bad)
