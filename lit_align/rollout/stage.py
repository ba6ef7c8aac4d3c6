"""``RolloutStage``: what every on-policy method does to get experience, done one way."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_align.forward import backbone_hidden_states, eval_mode, response_rewards, unembedding_logps
from lit_align.ops import completion_mask, pack_responses
from lit_align.parallel import fsdp_root, run_forward
from lit_align.rewards import score_text
from lit_align.rollout.experience import Experience
from lit_align.rollout.generators import Generator, HFGenerator, completion_seeds


class TokenLogps(NamedTuple):
    """Completion log-probs from :meth:`RolloutStage.completion_logps`: ``logps`` ``[n, R]`` (0 past each
    completion's end), and when asked, per scored token (``[M]``, in the batch's ``target_*`` order) the
    ``entropy`` of the distribution and the ``hidden`` states ``[M, H]`` that predicted it (for a value head)."""

    logps: torch.Tensor
    entropy: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


def to_completions(values: torch.Tensor, batch: Mapping[str, torch.Tensor], width: int) -> torch.Tensor:
    """``[n, width]``: per-token ``values`` ``[M]`` (in a packed batch's ``target_*`` order) laid out per completion,
    0 past each completion's end."""
    lengths, which = batch["response_lengths"], batch["target_response"]
    offsets = torch.arange(len(which), device=which.device) - (lengths.cumsum(0) - lengths)[which]
    return values.new_zeros(len(lengths), width).index_put((which, offsets), values)


class RolloutStage:
    """The rollout every on-policy method shares (PPO and GRPO hold one; RLOO, online DPO and distillation build on
    it): sample ``group_size`` completions per prompt through a :class:`~lit_align.rollout.Generator`, score them
    (reward functions with weights, or a reward model at each completion's last token, less a missing-EOS penalty),
    pack a prompt with its completions into scoring rows (:func:`~lit_align.ops.pack_responses`, the layout the
    preference collator uses), and compute completion log-probs, each one way. A method keeps its own models and
    maths; the stage holds no model.

    Args:
        tokenizer: the policy's tokenizer.
        generator: the sampling engine (default :class:`~lit_align.rollout.HFGenerator`).
        group_size: completions per prompt.
        max_new_tokens, temperature, top_p: sampling (log-probs are taken at the same temperature).
        share_prompt: pack a prompt and its completions into one row (an attention implementation that takes a
            custom mask: sdpa or eager); false: one row per completion.
        reward_fns: reward functions of the text (their scores are combined with ``reward_weights``); none: score
            with a reward model passed to :meth:`score`.
        missing_eos_penalty: subtracted from the reward of completions that never emit EOS (``None``: none).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        generator: Generator | None = None,
        group_size: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        share_prompt: bool = True,
        reward_fns: Sequence[Callable[..., Any]] = (),
        reward_weights: Sequence[float] | None = None,
        missing_eos_penalty: float | None = None,
    ) -> None:
        self.tokenizer, self.generator = tokenizer, generator or HFGenerator()
        self.generator.setup(tokenizer)
        self.group_size, self.max_new_tokens, self.temperature, self.top_p = (
            group_size,
            max_new_tokens,
            temperature,
            top_p,
        )
        self.share_prompt = share_prompt
        self.reward_fns = list(reward_fns)
        self.reward_weights = torch.tensor(reward_weights or [1.0] * max(len(self.reward_fns), 1), dtype=torch.float32)
        self.missing_eos_penalty = missing_eos_penalty

    # ----- sampling -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self, model: nn.Module, prompts: Mapping[str, Any], stream: Sequence[Any], group_size: int | None = None
    ) -> Experience:
        """``group_size`` (default the stage's) completions for each prompt of a
        :class:`~lit_align.data.PromptCollator` batch, sampled from ``model`` in eval mode, each from its own seed
        (``stream``: the run's seed and the phase, e.g. ``(seed, "train", epoch)``; with the prompt's key)."""
        group_size = group_size or self.group_size
        keys = prompts.get("keys")
        keys = list(range(len(prompts["input_ids"]))) if keys is None else keys.tolist()
        seeds = completion_seeds(*stream, keys=keys, num_samples=group_size)
        tok = self.tokenizer
        with eval_mode(model):
            completions = self.generator(
                model, prompts["input_ids"], prompts["attention_mask"], max_new_tokens=self.max_new_tokens,
                temperature=self.temperature, top_p=self.top_p, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, num_samples=group_size, seeds=seeds.to(prompts["input_ids"].device),
            )  # fmt: skip
        mask = completion_mask(completions.ids, tok.eos_token_id)
        ids = completions.ids.masked_fill(mask == 0, tok.pad_token_id)
        has_eos = ((ids == tok.eos_token_id) & (mask == 1)).any(-1)
        sampler_logps = None if completions.logps is None else completions.logps.float() * mask
        references = prompts.get("references")
        return Experience(
            prompt_ids=[row[m.bool()].tolist() for row, m in zip(prompts["input_ids"], prompts["attention_mask"])],
            prompt_text=list(prompts["prompt_text"]), references=None if references is None else list(references),
            group_size=group_size, completion_ids=ids, completion_mask=mask,
            completion_text=tok.batch_decode(ids, skip_special_tokens=True), has_eos=has_eos,
            sampler_logps=sampler_logps,
        )  # fmt: skip

    # ----- scoring rows and log-probs ---------------------------------------------------------------------------------
    def pack(self, experience: Experience, prompts: Sequence[int] | None = None, device: Any = None) -> dict[str, Any]:
        """The scoring rows of the completions of ``prompts`` (indices; default all), on ``device``: a prompt with
        its completions in one row when ``share_prompt``, else a row per completion (layout:
        :func:`~lit_align.ops.pack_responses`)."""
        examples = experience.examples(prompts)
        batch = pack_responses([(e["prompt_ids"], e["response_ids"]) for e in examples], self.tokenizer.pad_token_id,
                               self.share_prompt)  # fmt: skip
        return {k: v.to(device) for k, v in batch.items()} if device is not None else batch

    def completion_logps(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], width: int, entropy: bool = False,
        hidden: bool = False, temperature: float | None = None,
    ) -> TokenLogps:  # fmt: skip
        """Log-probs of the completion tokens of a packed ``batch`` under ``model`` at the sampling temperature (the
        distribution they were drawn from), ``[n, width]``, or at ``temperature`` when given (online DPO scores the
        policy itself, at 1); the unembedding runs only at the positions that predict completion tokens. One forward
        of the model's FSDP root when it is sharded."""
        temperature = self.temperature if temperature is None else temperature

        def forward() -> TokenLogps:
            states = backbone_hidden_states(model, batch)[batch["target_row"], batch["target_col"]]
            out = unembedding_logps(model, states, batch["target_id"], temperature=temperature,
                                    return_entropy=entropy)  # fmt: skip
            flat = out[0] if entropy else out
            return TokenLogps(to_completions(flat, batch, width), out[1] if entropy else None,
                              states if hidden else None)  # fmt: skip

        return run_forward(fsdp_root(model), forward)

    # ----- scoring --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(
        self, experience: Experience, reward_model: nn.Module | None = None, reward_offset: float = 0.0,
        batches: Sequence[Mapping[str, torch.Tensor]] = (),
    ) -> Experience:  # fmt: skip
        """Fill ``experience.scores`` ``[N, F]`` (each reward function's scores of the text, given the data's
        references when it has them; or the reward model's at each completion's last token of the packed
        ``batches``, less its normalisation offset) and ``experience.rewards`` ``[N]`` (the weighted sum, less the
        missing-EOS penalty). Returns ``experience``."""
        device = experience.completion_ids.device
        if self.reward_fns:
            g = experience.group_size
            repeat = lambda values: [v for v in values for _ in range(g)]  # noqa: E731
            references = repeat(experience.references) if experience.references is not None else None
            prompts, texts = repeat(experience.prompt_text), experience.completion_text
            columns = [score_text(fn, prompts, texts, references) for fn in self.reward_fns]
            scores = torch.stack(columns, -1).to(device)
        else:
            if reward_model is None:
                raise ValueError("no reward: give the stage reward functions, or score with a reward model")
            scores = torch.cat([response_rewards(reward_model, b) for b in batches]).to(device) - reward_offset
            scores = scores.unsqueeze(-1)
        rewards = (scores * self.reward_weights.to(device)).sum(-1)
        if self.missing_eos_penalty is not None:
            rewards = rewards - self.missing_eos_penalty * (~experience.has_eos).float()
        experience.scores, experience.rewards = scores, rewards
        return experience

    # ----- the sampler against the trainer ----------------------------------------------------------------------------
    @staticmethod
    def mismatch(experience: Experience, logps: torch.Tensor) -> dict[str, torch.Tensor]:
        """How far the sampler's log-probs are from the trainer's ``logps`` ``[N, R]`` (the policy as sampled) over the
        completion tokens: ``rollout/logp_diff_mean`` and ``rollout/logp_diff_max`` of ``|sampler - trainer|``
        (empty without the sampler's log-probs)."""
        if experience.sampler_logps is None:
            return {}
        mask = experience.completion_mask.bool()
        diff = (experience.sampler_logps - logps.float()).abs()[mask]
        zero = logps.new_zeros((), dtype=torch.float32)
        return {"rollout/logp_diff_mean": diff.mean() if diff.numel() else zero,
                "rollout/logp_diff_max": diff.max() if diff.numel() else zero}  # fmt: skip
