"""Online DPO: pairing by score and the loss by hand and against TRL 1.16's own ``OnlineDPOTrainer.training_step``;
the step-0 identities on packed pairs; ties skipped or kept; training moves the policy (and tells the sampling engine)
and never the reference; and online DPO earns a learnable reward."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import LogpsReportingGenerator

from lit_align import OnlineDPOModule, PromptDataModule
from lit_align.losses import online_dpo_loss, score_pairs
from lit_align.rewards import CharacterFractionReward, LengthReward
from lit_align.rollout import Experience, HFGenerator, RolloutStage


# ----- the maths by hand ----------------------------------------------------------------------------------------------
def test_pairs_by_score_by_hand():
    """Pairs of samples (0, 1), (2, 3), (4, 5) scored 0.2 < 0.5, 0.7 = 0.7, 0.9 > 0.1: chosen 1, 2, 4 (the first of
    a tie, as TRL), rejected 0, 3, 5, the middle pair a tie. Groups of three take the first maximum against the last
    minimum: (1, 3, 3) gives 1 against 0; (2, 2, 2) gives 3 against 5, a tie, still two different samples."""
    chosen, rejected, tie = score_pairs(torch.tensor([0.2, 0.5, 0.7, 0.7, 0.9, 0.1]))
    assert chosen.tolist() == [1, 2, 4] and rejected.tolist() == [0, 3, 5] and tie.tolist() == [False, True, False]
    chosen, rejected, tie = score_pairs(torch.tensor([1.0, 3.0, 3.0, 2.0, 2.0, 2.0]), group_size=3)
    assert chosen.tolist() == [1, 3] and rejected.tolist() == [0, 5] and tie.tolist() == [False, True]
    with pytest.raises(ValueError, match="group_size=2"):
        score_pairs(torch.zeros(3))
    with pytest.raises(ValueError, match="group_size=1 >= 2"):
        score_pairs(torch.zeros(4), group_size=1)


def test_online_dpo_loss_by_hand():
    """Policy log-probs (-1, -2, -3, -3), reference (-1.5, -1.5, -3, -3), scores (1, 0, 0.5, 0.5), beta 1.
    Pair 1: sample 0 chosen, h = (-1 + 1.5) - (-2 + 1.5) = 1, loss ln(1 + e^-1), implicit rewards 0.5 and -0.5.
    Pair 2 is a tie: h = 0, loss ln 2. Skipped, the loss is pair 1's alone; kept, the mean of both; divided by a
    given count of 0.5 (one pair over two ranks), twice pair 1's. All ties skipped: loss 0, and no gradient."""
    logps = torch.tensor([-1.0, -2.0, -3.0, -3.0], requires_grad=True)
    ref = torch.tensor([-1.5, -1.5, -3.0, -3.0])
    rewards, lengths = torch.tensor([1.0, 0.0, 0.5, 0.5]), torch.tensor([3, 4, 2, 2])
    first = math.log1p(math.exp(-1.0))
    loss, values = online_dpo_loss(logps, ref, rewards, lengths, beta=1.0)
    assert loss.item() == pytest.approx(first, abs=1e-6)
    assert values["tie"].tolist() == [False, True] and values["chosen"].tolist() == [0, 2]
    assert values["chosen_rewards"].tolist() == pytest.approx([0.5, 0.0]) == (-values["rejected_rewards"]).tolist()
    assert values["losses"].tolist() == pytest.approx([first, math.log(2)], abs=1e-6)
    loss, _ = online_dpo_loss(logps, ref, rewards, lengths, ties="keep", beta=1.0)
    assert loss.item() == pytest.approx((first + math.log(2)) / 2, abs=1e-6)
    loss, _ = online_dpo_loss(logps, ref, rewards, lengths, n_pairs=0.5, beta=1.0)
    assert loss.item() == pytest.approx(2 * first, abs=1e-6)
    loss, _ = online_dpo_loss(logps, ref, torch.zeros(4), lengths, beta=1.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logps.grad, torch.zeros(4))
    with pytest.raises(ValueError, match="unknown ties 'drop'"):
        online_dpo_loss(logps, ref, rewards, lengths, ties="drop")


# ----- against TRL --------------------------------------------------------------------------------------------------
def _trl_online_dpo_step(loss_type, beta, logps, ref_logps, mask, rewards, has_eos, penalty):
    """TRL's ``OnlineDPOTrainer.training_step`` itself, with stand-ins for its sampling (``_generate``), its forward
    passes (``_forward``: the given per-token log-probs) and its reward functions. Its layout: the first sample of
    every prompt, then the second. Returns its loss and logged statistics."""
    from trl.experimental.online_dpo import OnlineDPOTrainer

    n, r = logps.shape
    eos, pad = 2, 0
    ids = torch.randint(3, 10, (n, r), generator=torch.Generator().manual_seed(1)) * mask + pad * (1 - mask)
    last = mask.sum(-1) - 1
    ids[torch.arange(n)[has_eos], last[has_eos]] = eos  # an EOS ends each completion that has one
    policy, reference = SimpleNamespace(train=lambda: None), object()
    args = SimpleNamespace(use_vllm=False, missing_eos_penalty=penalty, loss_type=loss_type,
                           torch_empty_cache_steps=None, optim="adamw_torch", n_gpu=1,
                           gradient_accumulation_steps=1)  # fmt: skip
    trainer = SimpleNamespace(
        args=args, beta=beta, eos_token_ids=[eos], ref_model=reference, reward_funcs=[None],
        stats=defaultdict(list), processing_class=SimpleNamespace(batch_decode=lambda x, **_: ["c"] * len(x)),
        accelerator=SimpleNamespace(gather_for_metrics=lambda x: x, backward=lambda loss, **_: None),
        _generate=lambda model, prompts, images: (torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1), ids, mask,
                                                  None),
        _forward=lambda model, *_: ref_logps if model is reference else logps,
        _calculate_rewards_from_functions=lambda **_: rewards.clone(),
    )  # fmt: skip
    loss = OnlineDPOTrainer.training_step(trainer, policy, {"prompt": [f"p{i}" for i in range(n // 2)]})
    return loss, {k: v[0] for k, v in trainer.stats.items()}


def _module(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("reward_fn", CharacterFractionReward())
    module = OnlineDPOModule(model="tiny", max_new_tokens=8, **kwargs)
    module.configure_model()
    return module


def _scored_experience(stage: RolloutStage, mask: torch.Tensor, has_eos: torch.Tensor) -> Experience:
    """An experience of ``N / 2`` prompts with two completions each, scored by ``stage``."""
    n = len(mask)
    experience = Experience(
        prompt_ids=[[1]] * (n // 2), prompt_text=["p"] * (n // 2), references=None, group_size=2,
        completion_ids=torch.zeros_like(mask), completion_mask=mask, completion_text=["c"] * n, has_eos=has_eos,
    )  # fmt: skip
    return stage.score(experience)


@pytest.mark.parametrize("penalty", [None, 0.3])
def test_loss_and_metrics_match_trls_online_dpo_training_step(penalty):
    """Random per-token log-probs, completion masks, scores (with ties) and missing EOS: TRL's ``training_step``
    (sigmoid; ties kept, as TRL keeps them) and this module's scoring (:class:`RolloutStage`, with the missing-EOS
    penalty) and :meth:`OnlineDPOModule.compute_loss` give the same loss and the same logged statistics (TRL's
    ``objective/kl`` sums every position; the log-probs past a completion's end are 0 here, as ours are)."""
    pytest.importorskip("trl", minversion="1.16")
    generator = torch.Generator().manual_seed(0)
    b, r = 6, 5
    n = 2 * b
    mask = (torch.arange(r) < torch.randint(1, r + 1, (n,), generator=generator)[:, None]).long()
    logps = -torch.rand(n, r, generator=generator, dtype=torch.float64) * 3 * mask
    ref = (logps + 0.5 * torch.randn(n, r, generator=generator, dtype=torch.float64)) * mask
    rewards = torch.randint(0, 3, (n,), generator=generator).float()  # few values: some pairs tie
    has_eos = torch.rand(n, generator=generator) < 0.6
    trl_loss, stats = _trl_online_dpo_step("sigmoid", 0.1, logps, ref, mask, rewards, has_eos, penalty)
    order = torch.stack([torch.arange(b), torch.arange(b) + b], -1).flatten()  # TRL's halves, interleaved per prompt
    module = _module(ties="keep", missing_eos_penalty=penalty, reward_fn=lambda p, c: rewards[order])
    experience = _scored_experience(module.rollout_stage, mask[order], has_eos[order])
    assert 0 < score_pairs(experience.rewards)[2].sum() < b  # some pairs tie
    loss, values = module.compute_loss(experience, logps[order].sum(-1), ref[order].sum(-1))
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    ours = {k: v.double().mean().item() for k, v in values.items()}
    for theirs, mine in (("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                         ("rewards/margins", "rewards/margins"), ("rewards/accuracies", "rewards/accuracies"),
                         ("logps/chosen", "logps/chosen"), ("logps/rejected", "logps/rejected"),
                         ("objective/scores_margin", "score_margin"), ("objective/scores", "reward_mean"),
                         ("objective/kl", "kl")):  # fmt: skip
        assert ours[mine] == pytest.approx(stats[theirs], abs=1e-6), mine
    assert 1 - ours["no_eos_fraction"] == pytest.approx(stats["val/contain_eos_token"])


def test_ipo_differs_from_trls_online_ipo_only_by_length_normalisation():
    """TRL's online trainer takes IPO on the summed log-ratio difference, ``(h - 1 / (2 beta))^2``, where TRL's
    ``DPOTrainer`` and lit_align (``DPOModule`` and this module alike) normalise each log-ratio by its length: with
    lengths of 1 the two are equal; with the real lengths they are not."""
    pytest.importorskip("trl", minversion="1.16")
    generator = torch.Generator().manual_seed(3)
    n, r = 8, 4
    mask = (torch.arange(r) < torch.randint(2, r + 1, (n,), generator=generator)[:, None]).long()
    logps = -torch.rand(n, r, generator=generator, dtype=torch.float64) * mask
    ref = (logps + 0.3 * torch.randn(n, r, generator=generator, dtype=torch.float64)) * mask
    rewards = torch.randn(n, generator=generator)
    trl_loss, _ = _trl_online_dpo_step("ipo", 0.5, logps, ref, mask, rewards, torch.ones(n, dtype=torch.bool), None)
    order = torch.stack([torch.arange(n // 2), torch.arange(n // 2) + n // 2], -1).flatten()
    args = (logps[order].sum(-1), ref[order].sum(-1), rewards[order])
    unit, _ = online_dpo_loss(*args, torch.ones(n), ties="keep", beta=0.5, loss_type="ipo")
    normalised, _ = online_dpo_loss(*args, mask[order].sum(-1), ties="keep", beta=0.5, loss_type="ipo")
    assert unit.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    assert abs(normalised.item() - trl_loss.item()) > 1e-3


# ----- the module -----------------------------------------------------------------------------------------------------
def _prompts(module, n=3, max_prompt_length=32):
    data = PromptDataModule(module.tokenizer, batch_size=n, max_prompt_length=max_prompt_length)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def test_pair_log_probs_are_the_policys_at_temperature_one_and_step_zero_is_ln_2():
    """Sampled at temperature 0.7, each completion's packed log-probs (the prompt shared by its two completions) are
    the plain Hugging Face forward's of ``prompt + completion`` alone at temperature 1; at step 0 the reference agrees
    exactly, so the KL is 0, every implicit reward 0 and the sigmoid loss ln 2."""
    module = _module(temperature=0.7)
    experience, packed, ref_logps = module.rollout(_prompts(module))
    assert experience.completion_mask.shape == (6, 8) and experience.group_size == 2
    assert packed["input_ids"].shape[0] == 3  # one row per prompt
    logps = module.rollout_stage.completion_logps(module.model, packed, experience.width, temperature=1.0).logps
    i = 0
    for example in experience.examples():
        for completion in example["response_ids"]:
            ids = torch.tensor([example["prompt_ids"] + completion])
            logits = module.model(input_ids=ids).logits[0, len(example["prompt_ids"]) - 1 : -1]
            alone = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
            assert torch.allclose(logps[i, : len(completion)], alone, atol=1e-4)
            i += 1
    assert torch.equal(ref_logps, logps.sum(-1))
    loss, values = module.compute_loss(experience, logps.sum(-1), ref_logps)
    assert not values["tie_fraction"].any()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert values["kl"].abs().max() == 0 and values["rewards/margins"].abs().max() == 0
    chosen_better = values["score_margin"] > 0
    assert chosen_better.all()


@pytest.mark.parametrize("ties", ["skip", "keep"])
def test_ties_are_counted_and_skipped_or_kept(ties):
    """A constant score: every pair ties (``tie_fraction`` 1). Skipped, the loss is 0 and nothing gets a gradient;
    kept (TRL), the first sample is chosen, the loss is ln 2 at step 0 and the policy gets a gradient."""
    module = _module(reward_fn=lambda prompts, completions: [0.35] * len(completions), ties=ties)
    experience, packed, ref_logps = module.rollout(_prompts(module))
    logps = module.rollout_stage.completion_logps(module.model, packed, experience.width, temperature=1.0).logps
    loss, values = module.compute_loss(experience, logps.sum(-1), ref_logps)
    assert values["tie_fraction"].float().mean() == 1.0 and values["score_margin"].abs().max() == 0
    loss.backward()
    grad = sum(p.grad.abs().sum() for p in module.model.parameters() if p.grad is not None)
    if ties == "skip":
        assert loss.item() == 0.0 and grad == 0
    else:
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and grad > 0


class CountingGenerator(HFGenerator):
    """Hugging Face sampling that counts the calls an engine with its own weights relies on."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.changed = self.released = 0

    def weights_changed(self):
        self.changed += 1

    def release(self):
        self.released += 1


def test_training_moves_the_policy_tells_the_engine_and_never_the_reference(tmp_path):
    """Two prompt batches: two optimizer steps, each followed by ``weights_changed`` on the generator (so vLLM gets
    the new weights), sampling released after each rollout and validation; the policy changed, the reference did
    not and is never saved; every metric is logged and finite."""
    generator = CountingGenerator()
    module = OnlineDPOModule(model="tiny", reward_fn=[CharacterFractionReward(), LengthReward(8)], lr=1e-3,
                             max_new_tokens=6, generator=generator)  # fmt: skip
    data = PromptDataModule(module.tokenizer, batch_size=2, max_prompt_length=24, val_fraction=0.1)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False, num_sanity_val_steps=0,
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)  # fmt: skip
    module.configure_model()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    ref_before = {k: v.clone() for k, v in module.ref_model.state_dict().items()}
    trainer.fit(module, data)
    assert trainer.global_step == 2 and generator.changed == 2 and generator.released == 3
    assert any(not torch.equal(before[k], v) for k, v in module.model.state_dict().items())
    assert all(torch.equal(ref_before[k], v) for k, v in module.ref_model.state_dict().items())
    assert not any(k.startswith("ref_model.") for k in module.state_dict())
    logged = trainer.callback_metrics
    keys = ["loss", "reward_mean", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "kl", "score_margin", "tie_fraction", "response_length",
            "no_eos_fraction", "reward_0", "reward_1"]  # fmt: skip
    for key in [*(f"train/{k}" for k in keys), "val/reward_mean", "val/response_length"]:
        assert torch.isfinite(logged[key]), key


def test_missing_eos_penalty_lowers_the_score_before_pairing():
    """EOS forbidden for 8 tokens: every completion is cut, so each score is the reward less the penalty."""
    module = _module(missing_eos_penalty=0.5, generator=HFGenerator({"min_new_tokens": 8}))
    experience, _, _ = module.rollout(_prompts(module))
    assert not experience.has_eos.any()
    assert torch.allclose(experience.rewards, experience.scores[:, 0] - 0.5)


def test_reward_model_lora_reference_and_reference_free_losses():
    """A reward model scores the pairs; with LoRA the reference is the policy with its adapters disabled (no copy);
    a reference-free loss (SimPO) needs no reference and logs no KL. A sampler's own log-probs are compared with the
    policy's (``rollout/logp_diff_*``)."""
    pytest.importorskip("peft")
    from lit_align import LoRA

    module = _module(reward_fn=None, reward_model="tiny", lora=LoRA(r=4, alpha=8, dropout=0.0))
    assert module.ref_model is None and module.reward_model is not None
    for p in module.model.parameters():  # move the adapters away from their zero start
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)
    experience, packed, ref_logps = module.rollout(_prompts(module))
    assert experience.rewards.shape == (6,) and experience.rewards.std() > 0
    with module.model.disable_adapter():
        base = module.rollout_stage.completion_logps(module.model, packed, experience.width, temperature=1.0)
    assert torch.equal(ref_logps, base.logps.sum(-1))
    module = _module(loss_type="simpo", generator=LogpsReportingGenerator(-0.5))
    assert module.ref_model is None and "kl" not in module.train_metrics
    experience, packed, ref_logps = module.rollout(_prompts(module))
    assert ref_logps is None
    logps = module.rollout_stage.completion_logps(module.model, packed, experience.width, temperature=1.0).logps
    mismatch = module.rollout_stage.mismatch(experience, module._sampling_logps(packed, experience, logps))
    assert mismatch["rollout/logp_diff_mean"].item() == pytest.approx(0.5, abs=1e-4)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="needs a reward"):
        OnlineDPOModule(model="tiny")
    with pytest.raises(ValueError, match="not both"):
        OnlineDPOModule(model="tiny", reward_fn=LengthReward(), reward_model="tiny")
    with pytest.raises(ValueError, match="2 reward functions"):
        OnlineDPOModule(model="tiny", reward_fn=[LengthReward(), LengthReward()], reward_weights=[1.0])
    with pytest.raises(ValueError, match="ties='first'"):
        OnlineDPOModule(model="tiny", reward_fn=LengthReward(), ties="first")
    with pytest.raises(ValueError, match="unknown DPO loss_type 'kto'"):
        OnlineDPOModule(model="tiny", reward_fn=LengthReward(), loss_type="kto")
    with pytest.raises(ValueError, match="temperature"):
        OnlineDPOModule(model="tiny", reward_fn=LengthReward(), temperature=0)


@pytest.mark.slow
def test_online_dpo_raises_a_learnable_reward(tmp_path):
    """The share of spaces among a completion's characters is a reward the tiny model can learn to earn from pairs
    of its own samples: 20 prompt batches of 32 prompts (two completions each, one optimizer step per batch) raise
    the mean reward from about 0.13 (measured 0.129 -> 0.610) while the KL to the reference, summed over a
    completion's 8 tokens, stays bounded (measured at most 37 nats: under 5 a token)."""
    torch.manual_seed(0)
    module = OnlineDPOModule(model="tiny", reward_fn=CharacterFractionReward(), max_new_tokens=8, lr=2e-2, beta=0.1)
    data = PromptDataModule(module.tokenizer, batch_size=32, max_prompt_length=32)
    rewards, kls = [], []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            rewards.append(float(trainer.callback_metrics["train/reward_mean_step"]))
            kls.append(float(trainer.callback_metrics["train/kl_step"]))

    trainer = L.Trainer(max_epochs=2, limit_train_batches=10, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, callbacks=[Record()],
                        default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, data)
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"online DPO mean reward {first:.3f} -> {last:.3f} over {len(rewards)} batches; KL max {max(kls):.2f}")
    assert last > first + 0.2, rewards
    assert max(kls) < 8 * 10.0  # nats per completion: 10 a token


def test_samples_with_non_finite_rewards_are_refused_not_paired_with_themselves():
    """A NaN reward would be both a group's argmax and argmin (a sample paired with itself, counted but without
    signal): ranking refuses it with an error that shows the rewards."""
    with pytest.raises(ValueError, match="non-finite rewards"):
        score_pairs(torch.tensor([float("nan"), 1.0, 0.5, 0.2]))
