"""PPO: the pure maths by hand, the step-0 identities on left-padded rollouts, the KL controller, PPO-ptx's
gradient, checkpoint resume of every role and state, and that PPO earns a learnable reward."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from conftest import LogpsReportingGenerator

from lit_align import PPOModule, PromptDataModule
from lit_align.losses import gae, kl_penalty, ppo_policy_loss, ppo_value_loss, whiten
from lit_align.modules.ppo import AdaptiveKLController, FixedKLController
from lit_align.ops import completion_mask, position_ids_from_mask
from lit_align.rewards import CharacterFractionReward


def test_gae_by_hand():
    """Row 1: r = (1, 0, 2), V = (0.5, 1.0, 1.5), gamma 0.9, lambda 0.8 (gamma lambda = 0.72):
    delta_2 = 2 - 1.5 = 0.5, A_2 = 0.5; delta_1 = 0 + 0.9 * 1.5 - 1.0 = 0.35, A_1 = 0.35 + 0.72 * 0.5 = 0.71;
    delta_0 = 1 + 0.9 * 1.0 - 0.5 = 1.4, A_0 = 1.4 + 0.72 * 0.71 = 1.9112; returns = A + V.
    Row 2 is two tokens long (the third is padding, whatever its values): r = (1, 3), V = (2, 1):
    A_1 = 3 - 1 = 2; A_0 = 1 + 0.9 * 1 - 2 + 0.72 * 2 = 1.34."""
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 3.0, 5.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [2.0, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(advantages, torch.tensor([[1.9112, 0.71, 0.5], [1.34, 2.0, 0.0]]), atol=1e-6)
    assert torch.allclose(returns, torch.tensor([[2.4112, 1.71, 2.0], [3.34, 3.0, 0.0]]), atol=1e-6)


def test_ppo_policy_loss_by_hand():
    """Advantage +1 on two tokens. Ratio 1.5: the clipped term 1.2 is smaller, so -1.2 and clipped. Ratio 0.5: the
    unclipped 0.5 is smaller, so -0.5. Mean -0.85, clip fraction 1/2; approx KL = mean((r - 1) - ln r)."""
    old = torch.zeros(1, 3)
    new = torch.tensor([[math.log(1.5), math.log(0.5), 7.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, clip_fraction, approx_kl = ppo_policy_loss(new, old, torch.ones(1, 3), mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-0.85) and clip_fraction.item() == pytest.approx(0.5)
    expected_kl = ((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2
    assert approx_kl.item() == pytest.approx(expected_kl, abs=1e-6)


def test_ppo_value_loss_by_hand():
    """New value 2, old value 1, return 3, clip 0.2: the clipped value 1.2 has the larger error (1.8^2 = 3.24 vs 1),
    so the loss is 3.24 / 2 = 1.62."""
    loss, clip_fraction = ppo_value_loss(
        torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[3.0]]), torch.tensor([[1]]), clip_eps=0.2
    )
    assert loss.item() == pytest.approx(1.62) and clip_fraction.item() == 1.0


def test_kl_estimators_by_hand():
    """p = 1/2, p_ref = 1/4: k1 = ln 2; k3 = (p_ref / p - 1) - ln(p_ref / p) = -0.5 + ln 2."""
    logps, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_penalty(logps, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(logps, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))
    assert kl_penalty(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(logps, ref, "k2")


def test_whiten_and_response_mask():
    values = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(whiten(values, mask), torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-4)
    assert completion_mask(torch.tensor([[5, 2, 7], [5, 6, 7]]), eos_token_id=2).tolist() == [[1, 1, 0], [1, 1, 1]]


def test_adaptive_kl_controller_moves_towards_the_target():
    """Ziegler et al.: above the target the coefficient rises, below it falls, by at most 20% x n / horizon."""
    high = AdaptiveKLController(0.1, target=6.0, horizon=100)
    high.update(current_kl=60.0, n_steps=10)
    assert high.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    low = AdaptiveKLController(0.1, target=6.0, horizon=100)
    low.update(current_kl=3.0, n_steps=10)
    assert low.value == pytest.approx(0.1 * (1 - 0.2 * 10 / 100))
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1
    restored = AdaptiveKLController(0.5, 6.0, 100)
    restored.load_state_dict(high.state_dict())
    assert restored.value == high.value


def prompts_batch(module, n=6):
    data = PromptDataModule(module.tokenizer, batch_size=n, max_prompt_length=48)
    data.setup()
    return data, data.collator(data.train_dataset[:n])


@pytest.mark.parametrize("value_model", ["reward", "policy_head"])
def test_rollout_before_any_update_has_ratio_one_and_zero_kl(value_model):
    torch.manual_seed(0)
    module = PPOModule(max_new_tokens=12, mini_batch_size=4, value_model=value_model)
    module.configure_model()
    _, batch = prompts_batch(module)
    assert (batch["attention_mask"] == 0).any()  # the prompts really are left-padded for sampling
    rollout = module.rollout(batch)
    real = rollout.mask.bool()
    assert torch.equal(rollout.kl[real], torch.zeros(int(real.sum())))
    module.train()
    with torch.no_grad():
        packed = module.rollout_stage.pack(rollout.experience)
        logps = module.rollout_stage.completion_logps(module.model, packed, rollout.experience.width).logps
    ratio = (logps - rollout.logps).exp()[real]
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5)
    assert torch.isfinite(rollout.advantages).all() and torch.isfinite(rollout.values).all()


def test_a_samplers_own_log_probs_are_compared_with_the_trainers_and_corrected():
    """PPO with a generator that reports its own log-probs 0.3 nats above the policy's: ``rollout/logp_diff_*`` is
    0.3 and each completion token's TIS weight is ``min(exp(-0.3), 1.2)``; without ``tis_cap`` there are none."""
    torch.manual_seed(0)
    module = PPOModule(max_new_tokens=12, mini_batch_size=4, generator=LogpsReportingGenerator(0.3), tis_cap=1.2)
    module.configure_model()
    _, batch = prompts_batch(module)
    rollout = module.rollout(batch)
    real = rollout.mask.bool()
    assert rollout.mismatch["rollout/logp_diff_max"].item() == pytest.approx(0.3, abs=1e-4)
    assert torch.allclose(rollout.token_weights[real], torch.full((int(real.sum()),), math.exp(-0.3)), atol=1e-4)
    module.tis_cap = None
    assert module.rollout(batch).token_weights is None


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logps_equal_the_left_padded_forward_they_were_sampled_from(temperature):
    """PPO used to score its responses on the left-padded prompt + response rows it sampled from; the rollout stage
    scores them packed (a row per completion, right-padded, positions continuing the prompt's). Both are a plain
    forward of the left-padded rows: equal within 1e-5 (fp32), at the sampling temperature."""
    torch.manual_seed(0)
    module = PPOModule(max_new_tokens=12, mini_batch_size=4, temperature=temperature)
    module.configure_model()
    _, batch = prompts_batch(module)
    experience = module.sample(batch)
    ids = torch.cat([batch["input_ids"], experience.completion_ids], 1)
    attention_mask = torch.cat([batch["attention_mask"], experience.completion_mask], 1)
    module.eval()
    with torch.no_grad():
        logits = module.model(input_ids=ids, attention_mask=attention_mask,
                              position_ids=position_ids_from_mask(attention_mask)).logits.float()  # fmt: skip
        start = batch["input_ids"].shape[1] - 1
        logps = torch.log_softmax(logits[:, start:-1] / temperature, -1)
        expected = logps.gather(-1, experience.completion_ids.unsqueeze(-1)).squeeze(-1) * experience.completion_mask
        packed = module.rollout_stage.pack(experience)
        got = module.rollout_stage.completion_logps(module.model, packed, experience.width).logps
    assert experience.completion_mask.sum() > 10
    assert torch.allclose(got, expected, atol=1e-5)


def test_ptx_term_adds_exactly_its_gradient():
    """With ptx_coef 0 a pre-training batch changes nothing; with ptx_coef c the gradient is the PPO gradient plus
    c times the gradient of the pre-training NLL."""
    torch.manual_seed(0)
    module = PPOModule(max_new_tokens=8, mini_batch_size=4, reward_fn=CharacterFractionReward())
    module.configure_model()
    data = PromptDataModule(module.tokenizer, batch_size=4, pretrain_data="bundled:self_instruct_seed_tasks.jsonl")
    data.setup()
    rollout = module.rollout(data.collator(data.train_dataset[:4]))
    ptx_batch = data.ptx_collator(data.ptx_dataset[:3])
    idx = torch.arange(4)

    def grads(loss):
        module.model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in module.model.parameters()]

    module.ptx_coef = 0.0
    without = grads(module.policy_objective(rollout, idx, None)[0])
    ignored = grads(module.policy_objective(rollout, idx, ptx_batch)[0])
    assert all(torch.equal(a, b) for a, b in zip(without, ignored))
    module.ptx_coef = 0.7
    combined = grads(module.policy_objective(rollout, idx, ptx_batch)[0])
    ptx_only = grads(module.ptx_loss(ptx_batch))
    for c, w, p in zip(combined, without, ptx_only):
        assert torch.allclose(c, w + 0.7 * p, atol=1e-6)
    assert any(not torch.equal(c, w) for c, w in zip(combined, without))


def _trainer(tmp_path, **kwargs):
    return L.Trainer(
        default_root_dir=tmp_path, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, **kwargs,
    )  # fmt: skip


def test_resume_restores_policy_value_optimizers_and_kl_controller(tmp_path):
    torch.manual_seed(0)
    kwargs = dict(lr=1e-3, max_new_tokens=8, mini_batch_size=4, num_iterations=1, adaptive_kl=True, kl_target=0.01,
                  kl_horizon=10)  # fmt: skip
    module = PPOModule(**kwargs)
    data = PromptDataModule(module.tokenizer, batch_size=4, max_prompt_length=32)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2)
    trainer.fit(module, data)
    assert module.kl_controller.value != 0.02  # it moved
    path = tmp_path / "ppo.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    assert not any(k.startswith(("ref_model.", "reward_model.")) for k in saved["state_dict"])
    assert len(saved["optimizer_states"]) == 2

    seen = {}

    class Capture(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["kl"] = pl_module.kl_controller.value
            seen["policy"] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
            seen["value"] = {k: v.clone() for k, v in pl_module.value_model.state_dict().items()}
            seen["optimizers"] = [o.state_dict() for o in trainer.optimizers]
            trainer.should_stop = True  # nothing more to train: only the restored state is looked at

    resumed = PPOModule(**kwargs)
    _trainer(tmp_path, max_epochs=2, limit_train_batches=2, callbacks=[Capture()]).fit(resumed, data, ckpt_path=path)
    assert seen["kl"] == module.kl_controller.value
    assert all(torch.equal(v, module.model.state_dict()[k]) for k, v in seen["policy"].items())
    assert all(torch.equal(v, module.value_model.state_dict()[k]) for k, v in seen["value"].items())
    for restored, original in zip(seen["optimizers"], trainer.optimizers):
        original = original.state_dict()
        assert restored["param_groups"][0]["lr"] == original["param_groups"][0]["lr"]
        for key, state in original["state"].items():
            assert torch.equal(restored["state"][key]["exp_avg"], state["exp_avg"])


@pytest.mark.slow
def test_ppo_raises_a_learnable_reward_with_bounded_kl(tmp_path):
    """InstructGPT's order on the tiny model: SFT on the bundled Self-Instruct tasks, then PPO from that policy
    towards a programmatic reward it can learn to earn (the share of spaces among the response's characters, i.e.
    shorter words). Mean reward over the last five rollout batches beats the first five (measured 0.16 -> 0.26), and
    the KL to the SFT policy stays bounded (at most 5 nats per sequence)."""
    from lit_align import InstructionDataModule, SFTModule

    torch.manual_seed(0)
    sft = SFTModule(lr=3e-3, export_dir=str(tmp_path / "sft"))
    sft_data = InstructionDataModule(sft.tokenizer, val_fraction=0.0, max_length=256, batch_size=8)
    _trainer(tmp_path, max_epochs=3).fit(sft, sft_data)

    torch.manual_seed(0)
    module = PPOModule(
        model=str(tmp_path / "sft"), lr=1e-3, max_new_tokens=16, mini_batch_size=16, num_iterations=4, kl_coef=0.02,
        reward_fn=CharacterFractionReward(" "), reward_model=None,
    )  # fmt: skip
    data = PromptDataModule(module.tokenizer, batch_size=32, max_prompt_length=32)
    rewards, kls = [], []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rewards.append(float(trainer.callback_metrics["train/reward_mean_step"]))
            kls.append(float(trainer.callback_metrics["train/kl_step"]))

    _trainer(tmp_path, max_epochs=3, callbacks=[Record()]).fit(module, data)
    start, end = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"PPO mean reward {start:.3f} -> {end:.3f} over {len(rewards)} rollouts; KL per sequence max {max(kls):.2f}")
    assert end > start + 0.05
    assert max(kls) < 10.0


def test_missing_eos_penalty_and_score_normalisation_shape_the_rewards():
    """Before any update the KL is 0, so each row's rewards sum to its (shaped) score: the raw score minus the
    penalty for a response with no EOS (an untrained tiny model never emits one in 8 tokens), then standardised."""
    torch.manual_seed(0)
    module = PPOModule(max_new_tokens=8, reward_fn=CharacterFractionReward(" "), missing_eos_penalty=1.0)
    module.configure_model()
    _, batch = prompts_batch(module)
    rollout = module.rollout(batch)
    assert not rollout.experience.has_eos.any()
    assert torch.allclose(rollout.rewards.sum(-1), rollout.scores - 1.0, atol=1e-6)
    module.normalize_scores = True
    torch.manual_seed(0)
    rollout = module.rollout(batch)
    shaped = rollout.scores - 1.0
    assert torch.allclose(rollout.rewards.sum(-1), (shaped - shaped.mean()) / shaped.std(), atol=1e-5)
