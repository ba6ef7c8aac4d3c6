"""Programmatic rewards: the verifiable GSM8K answer reward by hand and on every real GSM8K row, and prompts rendered
from row fields with their reference answers carried to the reward."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHARED_DATA, needs_shared

from lit_align import PromptDataModule
from lit_align.data.sources import BUNDLED_DATA, DataError
from lit_align.rewards import CharacterFractionReward, NumericAnswerReward, final_number, score_text

GSM8K = "bundled:gsm8k_train_head200.jsonl"


def test_final_number_reads_the_marked_answer_else_the_last_number():
    assert final_number("48/2 = <<48/2=24>>24 clips.\n#### 72") == 72.0
    assert final_number("so she earned $1,250.50 in total") == 1250.5
    assert final_number("it is -3, not 4") == 4.0
    assert final_number("#### -3 apples, 4 pears") == -3.0
    assert final_number("no digits here") is None
    assert final_number("#### none") is None


def test_numeric_answer_reward_by_hand():
    reward = NumericAnswerReward()
    references = ["... #### 72", "... #### 1,000", "... #### 5"]
    responses = ["48 + 24 = 72", "The answer is #### 1000", "I think 6, or maybe 5 with 0 left"]
    assert reward(["q"] * 3, responses, references).tolist() == [1.0, 1.0, 0.0]  # the last number of the third is 0
    with pytest.raises(ValueError, match="needs reference answers: set reference_field"):
        reward(["q"], ["72"])
    with pytest.raises(ValueError, match="reference 0 holds no number"):
        reward(["q"], ["72"], ["#### seventy-two"])


def test_score_text_names_a_faulty_reward_function():
    def broken(prompts, responses):
        return [float("nan")] * len(responses)

    with pytest.raises(ValueError, match="reward function broken returned a non-finite score"):
        score_text(broken, ["p"], ["r"])
    with pytest.raises(ValueError, match=r"returned shape \(2,\) for 1 responses"):
        score_text(lambda p, r: [0.0, 1.0], ["p"], ["r"])
    assert score_text(CharacterFractionReward(), ["p"], ["a b"], references=["x"]).tolist() == [pytest.approx(1 / 3)]


@pytest.mark.reliability
@pytest.mark.parametrize(
    "returned", [None, [None], ["0.5"], "1", [[0.5]], {"a": 1.0}, 0.5], ids=lambda v: repr(v)
)  # fmt: skip
def test_a_reward_function_returning_non_numbers_is_named(returned, reliability):
    def sloppy(prompts, responses):
        return returned

    reliability["bad_inputs"] += 1
    with pytest.raises(ValueError, match="reward function sloppy returned"):
        score_text(sloppy, ["p"], ["r"])
    reliability["named_errors"] += 1
    assert score_text(lambda p, r: [True], ["p"], ["r"]).tolist() == [1.0]  # a pass/fail check counts as 0/1


def test_gsm8k_prompts_from_a_template_carry_their_reference_answers(tiny_tokenizer, tmp_path):
    data = PromptDataModule(tiny_tokenizer, GSM8K, prompt_template="Question: {question}\nAnswer:",
                            reference_field="answer", batch_size=4, max_prompt_length=512)  # fmt: skip
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert len(batch["references"]) == 4 and all("####" in r for r in batch["references"])
    assert all(p.startswith("Question: ") and p.endswith("\nAnswer:") for p in batch["prompt_text"])
    first = json.loads((BUNDLED_DATA / "gsm8k_train_head200.jsonl").open().readline())
    assert data.train_dataset[0]["prompt_text"] == f"Question: {first['question']}\nAnswer:"
    assert data.train_dataset[0]["reference"] == first["answer"]
    # the reference solutions themselves earn the reward
    assert NumericAnswerReward()(batch["prompt_text"], batch["references"], batch["references"]).tolist() == [1.0] * 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "2 + 2?", "answer": "#### 4"}) + "\n" + json.dumps({"q": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, row 2, field 'question': is missing"):
        PromptDataModule(tiny_tokenizer, str(bad), prompt_template="{question}").setup("fit")
    bad.write_text(json.dumps({"question": "2 + 2?", "answer": None}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, row 1, field .answer.: is missing"):
        PromptDataModule(tiny_tokenizer, str(bad), prompt_template="{question}", reference_field="answer").setup("fit")
    with pytest.raises(ValueError, match="is not a plain field name"):
        PromptDataModule(tiny_tokenizer, str(bad), prompt_template="{row[0]}")


@needs_shared
def test_every_real_gsm8k_solution_earns_the_reward_and_a_wrong_answer_does_not():
    rows = [json.loads(line) for line in (SHARED_DATA / "gsm8k_train.jsonl").read_text().splitlines()]
    assert len(rows) == 7473
    answers = [r["answer"] for r in rows]
    reward = NumericAnswerReward()
    assert reward([""] * len(rows), answers, answers).sum().item() == len(rows)
    wrong = [f"#### {final_number(a) + 1:g}" for a in answers]
    assert reward([""] * len(rows), wrong, answers).sum().item() == 0
    assert torch.equal(reward([""], [answers[0].split("####")[0]], answers[:1]), torch.tensor([1.0]))  # last number
