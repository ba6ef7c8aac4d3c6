"""Preference data and the reward model: Bradley-Terry maths, K-wise rankings, HH parsing, padding invariance,
precision, export round trip."""

from __future__ import annotations

import gzip
import json
import math
import sys

import lightning as L
import pytest
import torch
from conftest import REPO, SHARED_DATA, TOKENIZER_KINDS, needs_shared

from lit_align import PreferenceDataModule, RewardModule, RewardScorer
from lit_align.data import DataError, PreferenceCollator
from lit_align.data.preference import ranking_pairs, score_pairs, split_shared_prefix
from lit_align.data.sources import Record
from lit_align.data.tokenize import special_prefix
from lit_align.forward import last_token_index
from lit_align.losses import bradley_terry_loss, grouped_mean, kwise_bradley_terry_loss
from lit_align.ops import IGNORE_INDEX

HH_ROW = {
    "chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Rob a bank?\n\nAssistant: No, I can't help with that.",
    "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Rob a bank?\n\nAssistant: Sure, bring a mask.",
}


# ----- pure maths ----------------------------------------------------------------------------------------------
def test_bradley_terry_by_hand():
    """r_c - r_r = 1: -log sigmoid(1) = log(1 + e^-1); with margin 0.5: log(1 + e^-0.5); equal rewards: ln 2."""
    chosen, rejected = torch.tensor([1.0, 2.0, 0.3]), torch.tensor([0.0, 1.0, 0.3])
    assert torch.allclose(
        bradley_terry_loss(chosen, rejected),
        torch.tensor([math.log1p(math.exp(-1)), math.log1p(math.exp(-1)), math.log(2)]),
    )
    assert bradley_terry_loss(chosen[:1], rejected[:1], margin=0.5).item() == pytest.approx(math.log1p(math.exp(-0.5)))


def test_kwise_loss_is_the_mean_of_its_pairwise_losses():
    torch.manual_seed(0)
    rewards = torch.randn(4)
    pairs = ranking_pairs([2, 0, 3, 1])
    assert len(pairs) == 6  # C(4, 2)
    better, worse = torch.tensor([b for b, _ in pairs]), torch.tensor([w for _, w in pairs])
    pairwise = torch.stack([bradley_terry_loss(rewards[b : b + 1], rewards[w : w + 1])[0] for b, w in pairs])
    kwise = kwise_bradley_terry_loss(rewards, better, worse, torch.zeros(6, dtype=torch.long))
    assert kwise.item() == pytest.approx(pairwise.mean().item(), abs=1e-6)


def test_kwise_weighs_prompts_equally():
    """Prompt 0 has 3 pairs with losses a, b, c, prompt 1 one pair with loss d: the loss is ((a+b+c)/3 + d) / 2."""
    values = torch.tensor([1.0, 2.0, 3.0, 10.0])
    assert torch.allclose(grouped_mean(values, torch.tensor([0, 0, 0, 1])), torch.tensor([2.0, 10.0]))
    rewards = torch.tensor([3.0, 1.0, 0.0, 2.0, 5.0])
    loss = kwise_bradley_terry_loss(
        rewards, torch.tensor([0, 0, 1, 4]), torch.tensor([1, 2, 2, 3]), torch.tensor([0, 0, 0, 1])
    )
    expected = (sum(math.log1p(math.exp(-d)) for d in (2.0, 3.0, 1.0)) / 3 + math.log1p(math.exp(-3.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_pairs_from_rankings_and_scores():
    assert ranking_pairs([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]
    assert sorted(score_pairs([0.5, 2.0, 0.5])) == [(1, 0), (1, 2)]  # the tie gives no pair


def test_split_hh_dialogues_at_the_last_shared_assistant_turn():
    prompt, chosen, rejected = split_shared_prefix(HH_ROW["chosen"], HH_ROW["rejected"], "\n\nAssistant:")
    assert prompt.endswith("Rob a bank?\n\nAssistant:") and prompt.count("Assistant:") == 2
    assert chosen == " No, I can't help with that." and rejected == " Sure, bring a mask."


# ----- preference data -----------------------------------------------------------------------------------------
@needs_shared
@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_all_hh_rows_parse_with_counts(tokenizers_by_kind, kind):
    tiny_tokenizer = tokenizers_by_kind[kind]
    path = SHARED_DATA / "hh_rlhf_harmless_base_test.jsonl.gz"
    dm = PreferenceDataModule(tiny_tokenizer, train_data=str(path), val_fraction=0.0, max_length=512)
    dm.setup()
    counts = dm.stats["train"]
    assert counts["rows"] == 2312
    dropped = sum(v for k, v in counts.items() if k.startswith("dropped"))
    assert counts["examples"] + dropped == 2312 and counts["pairs"] == counts["examples"]
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f]
    identical = sum(r["chosen"] == r["rejected"] for r in rows)
    assert counts["dropped_identical"] == identical
    bos = special_prefix(tiny_tokenizer)
    for example in dm.train_dataset:
        for response in example["response_ids"]:
            sequence = example["prompt_ids"] + response
            if bos:
                assert sequence[: len(bos)] == bos and sequence.count(tiny_tokenizer.bos_token_id) == 1
            if len(sequence) < 512:
                assert response[-1] == tiny_tokenizer.eos_token_id
    # The prompt as the tokenizer encodes it at inference is an exact prefix.
    first = dm.parse(Record("hh, row 1", rows[0]))
    assert dm.train_dataset[0]["prompt_ids"] == tiny_tokenizer(first.prompt[0][0])["input_ids"]


def test_record_shapes(tiny_tokenizer):
    rows = [
        {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"},
        HH_ROW,
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Go away."},
        {
            "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}],
        },
        {"prompt": "Rate:", "responses": [" a", " b", " c"], "ranking": [1, 2, 0]},
        {"prompt": "Rate:", "responses": [" a", " b", " c"], "scores": [1.0, 1.0, 3.0]},
    ]
    dm = PreferenceDataModule(tiny_tokenizer, train_data=rows, val_fraction=0.0)
    dm.setup()
    examples = dm.train_dataset
    assert [len(e["pairs"]) for e in examples] == [1, 1, 1, 1, 3, 2]
    assert examples[2]["prompt_ids"] == examples[3]["prompt_ids"]  # explicit and implicit chat agree
    chat_response = tiny_tokenizer.decode(examples[2]["response_ids"][0])
    assert chat_response == "Hello!</s>"  # the template's own end of turn, no extra EOS
    assert examples[0]["response_ids"][0][-1] == tiny_tokenizer.eos_token_id


@pytest.mark.parametrize(
    "row, field",
    [
        ({"prompt": "q", "chosen": "a"}, "rejected"),
        ({"prompt": "q", "chosen": None, "rejected": "b"}, "chosen"),
        ({"prompt": "q", "responses": ["a", "b"], "ranking": [0, 0]}, "ranking"),
        ({"prompt": "q", "responses": ["a", "b"], "scores": [1.0]}, "scores"),
        ({"chosen": "no marker here", "rejected": "no marker there"}, "chosen"),
    ],
)
def test_bad_preference_rows_are_named(tiny_tokenizer, row, field):
    dm = PreferenceDataModule(
        tiny_tokenizer, train_data=[{"prompt": "q", "chosen": "a", "rejected": "b"}, row], val_fraction=0.0
    )
    with pytest.raises(DataError, match=rf"row 2, field '{field}'"):
        dm.setup()


def test_identical_and_truncated_pairs_are_dropped_and_counted(tiny_tokenizer):
    rows = [
        {"prompt": "Q:", "chosen": " same", "rejected": " same"},
        {"prompt": "Q:", "chosen": " same start then A", "rejected": " same start then B"},
        {"prompt": "word " * 50, "chosen": " a", "rejected": " b"},
        {"prompt": "Q:", "chosen": " yes", "rejected": " no"},
    ]
    dm = PreferenceDataModule(tiny_tokenizer, train_data=rows, val_fraction=0.0, max_length=6)
    dm.setup()
    counts = dm.stats["train"]
    assert counts["dropped_identical"] == 1
    assert counts["dropped_identical_after_truncation"] == 1
    assert counts["dropped_empty_after_truncation"] == 1
    assert counts["examples"] == 1


def test_long_prompts_keep_bos_and_their_end(tiny_tokenizer):
    row = {"prompt": "one two three four five six seven eight nine ten eleven twelve", "chosen": " a", "rejected": " b"}
    dm = PreferenceDataModule(tiny_tokenizer, train_data=[row], val_fraction=0.0, max_prompt_length=4)
    dm.setup()
    full = tiny_tokenizer(row["prompt"])["input_ids"]
    assert dm.train_dataset[0]["prompt_ids"] == full[:1] + full[-3:]
    assert dm.stats["train"]["prompt_truncated"] == 1


# ----- the reward model --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward_module():
    torch.manual_seed(0)
    module = RewardModule()
    module.configure_model()
    return module.eval()


def encode(module, prompt, response):
    dm = PreferenceDataModule(
        module.tokenizer, train_data=[{"prompt": prompt, "chosen": response, "rejected": "x"}], val_fraction=0.0
    )
    dm.setup()
    e = dm.train_dataset[0]
    return e["prompt_ids"] + e["response_ids"][0]


@pytest.mark.parametrize("pad_id", ["pad", "eos"])
def test_score_is_invariant_to_neighbours_and_padding_side(reward_module, pad_id):
    tok = reward_module.tokenizer
    target = encode(reward_module, "Human: is the sky blue?\n\nAssistant:", " Yes, on a clear day.")
    short = encode(reward_module, "Hi", " ok")
    long = encode(reward_module, "Tell me a long story about a dragon " * 5, " Once upon a time " * 5)
    pad = tok.pad_token_id if pad_id == "pad" else tok.eos_token_id
    scores = []
    with torch.no_grad():
        for side in ("right", "left"):
            for neighbours in ([short], [long], [short, long]):
                examples = [{"prompt_ids": s, "response_ids": [[]], "pairs": []} for s in [target, *neighbours]]
                batch = PreferenceCollator(pad, side)(examples)
                scores.append(reward_module.rewards(batch)[0])
        alone = reward_module.rewards(
            PreferenceCollator(pad)([{"prompt_ids": target, "response_ids": [[]], "pairs": []}])
        )
    for score in scores:
        assert torch.allclose(score, alone[0], atol=1e-5)


def test_last_token_index_for_both_padding_sides():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 3, 3]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_extreme_rewards_under_autocast_stay_finite(dtype):
    torch.manual_seed(0)
    module = RewardModule()
    module.configure_model()
    with torch.no_grad():
        module.model.score.weight.mul_(1e4)  # rewards in the thousands, differences far beyond fp16's exp range
    batch = PreferenceCollator(module.tokenizer.pad_token_id)(
        [
            {
                "prompt_ids": encode(module, "Q:", " fine")[:3],
                "response_ids": [[40, 41], [42, 43, 44]],
                "pairs": [(0, 1), (1, 0)],
            }
        ]
    )
    with torch.autocast("cpu", dtype=dtype):
        out = module.step(batch)
    assert out["rewards"].abs().max() > 100
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in module.model.parameters() if p.grad is not None)


def test_training_export_and_scorer_round_trip(tmp_path):
    L.seed_everything(0)
    rows = [
        {"prompt": f"Q{i}: be polite.", "chosen": " Thank you kindly.", "rejected": " Go away, idiot."}
        for i in range(24)
    ]
    module = RewardModule(lr=3e-3, normalize=True, export_dir=str(tmp_path / "rm"))
    dm = PreferenceDataModule(module.tokenizer, train_data=rows, val_data=rows[:8], batch_size=8)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=12,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    module.configure_model()
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer.fit(module, dm)
    assert not torch.equal(module.model.score.weight, initial["score.weight"])
    metrics = trainer.validate(module, dm, verbose=False)[0]
    assert metrics["val/accuracy"] == 1.0 and metrics["val/margin"] > 0
    assert abs(metrics["val/reward_mean"]) < 1e-4  # normalised on these responses
    scorer = RewardScorer.from_pretrained(tmp_path / "rm")
    prompts = [r["prompt"] for r in rows[:4]] * 2
    responses = [r["chosen"] for r in rows[:4]] + [r["rejected"] for r in rows[:4]]
    scores = scorer.score(prompts, responses)
    module.eval()
    with torch.no_grad():
        batch = dm.collator(dm.val_dataset[:4])
        expected = module.rewards(batch)
    order = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # the collator interleaves chosen/rejected per prompt
    assert torch.allclose(scores, expected[order], atol=1e-5)
    assert (scores[:4] > scores[4:]).all()
    assert batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].numel() > 0


@needs_shared
@pytest.mark.slow
def test_training_on_hh_raises_held_out_accuracy(capsys):
    """InstructGPT step 2 on real comparisons: held-out pairwise accuracy after one epoch beats the untrained model's
    (benchmarks/reward_accuracy.py runs the longer version)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from reward_accuracy import held_out_accuracy

    result = held_out_accuracy(str(SHARED_DATA / "hh_rlhf_harmless_base_test.jsonl.gz"), epochs=1, max_length=128)
    with capsys.disabled():
        print(f"\nHH held-out accuracy: untrained {result['untrained']:.3f} -> trained {result['trained']:.3f}")
    assert result["trained"] > result["untrained"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_prompt_shared_rows_score_each_response_as_if_alone(reward_module, side):
    """share_prompt packs a prompt and its K responses into one row; each response's reward equals the reward of
    prompt + that response forwarded on its own."""
    dm = PreferenceDataModule(
        reward_module.tokenizer,
        [{"prompt": "Rank these.", "responses": ["A short one.", "A somewhat longer answer.", "Third."],
          "ranking": [1, 0, 2]},
         {"prompt": "Human: hi\n\nAssistant:", "chosen": " Hello!", "rejected": " Go away."}],
        val_fraction=0.0,
    )  # fmt: skip
    dm.setup()
    with torch.no_grad():
        packed = reward_module.rewards(PreferenceCollator(0, side, share_prompt=True)(dm.train_dataset))
        separate = reward_module.rewards(PreferenceCollator(0, side)(dm.train_dataset))
        alone = torch.cat(
            [
                reward_module.rewards(
                    PreferenceCollator(0)([{"prompt_ids": e["prompt_ids"] + r, "response_ids": [[]], "pairs": []}])
                )
                for e in dm.train_dataset
                for r in e["response_ids"]
            ]
        )
    assert packed.shape == (5,)
    assert torch.allclose(packed, alone, atol=1e-5) and torch.allclose(separate, alone, atol=1e-5)
