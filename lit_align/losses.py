"""Pure loss and log-probability functions: plain torch, no Lightning, each with its shapes and source.

Shapes: ``B`` batch, ``T`` sequence length, ``V`` vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lit_align.ops import IGNORE_INDEX

_LOGSUMEXP_CHUNK = 4096  # rows of [.., V] converted to fp32 at a time when logits are in half precision


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is true (over ``dim``, or everything). Empty masks give 0, not NaN."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def _token_mean(values: torch.Tensor, mask: torch.Tensor, n_tokens: torch.Tensor | float | None) -> torch.Tensor:
    """The sum of ``values`` where ``mask`` is true divided by ``n_tokens`` (default: how many that is)."""
    if n_tokens is None:
        return masked_mean(values, mask)
    normaliser = torch.as_tensor(n_tokens, dtype=values.dtype, device=values.device)
    return (values * mask.to(values.dtype)).sum() / normaliser.clamp(min=1)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., index]`` in fp32 without materialising the ``[..., V]`` fp32 log-softmax.

    Args:
        logits: ``[..., V]`` in any float dtype.
        index: ``[...]`` token ids (any value where the result is ignored; it must be a valid id).

    Returns:
        ``[...]`` fp32 log-probabilities: the gathered logit minus the log-sum-exp over the vocabulary. Half-precision
        logits are upcast a chunk of rows at a time, so the fp32 temporary is at most ``chunk x V``.
    """
    picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1).float()
    if logits.dtype in (torch.float32, torch.float64):
        return picked - torch.logsumexp(logits, dim=-1).float()
    flat = logits.reshape(-1, logits.shape[-1])
    lse = torch.cat([torch.logsumexp(chunk.float(), dim=-1) for chunk in flat.split(_LOGSUMEXP_CHUNK)])
    return picked - lse.view(picked.shape)


_LOGIT_BUDGET = 1 << 24  # elements of a [rows, V] logits tile: 64 MiB in fp32


class _LinearLogProbs(torch.autograd.Function):
    """Gathered log-softmax of ``(hidden @ weight.T + bias) / temperature``, computed a tile of rows at a time; the
    backward recomputes each tile's logits instead of saving them, so neither the ``[M, V]`` logits nor a ``[M, V]``
    fp32 log-softmax is ever held (only the ``[M]`` log-sum-exps). Also returns, without gradient, whether each
    target is the top token and the entropy of each row's distribution (computed from the same tiles)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, compute_dtype, rows, inv_temperature, want_entropy):
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        acc = torch.promote_types(compute_dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        lse, picked, correct, entropy = [], [], [], []
        for start in range(0, h.shape[0], rows):
            logits = F.linear(h[start : start + rows], w, b).to(acc) * inv_temperature
            tile_lse = torch.logsumexp(logits, -1)
            lse.append(tile_lse)
            picked.append(logits.gather(-1, targets[start : start + rows, None]).squeeze(-1))
            correct.append(logits.argmax(-1) == targets[start : start + rows])
            if want_entropy:  # only when asked: it costs a pass over the tile
                entropy.append(tile_lse - (logits - tile_lse[:, None]).exp_().mul_(logits).sum(-1))
        empty = h.new_zeros(0, dtype=acc)
        lse, picked = (torch.cat(x) if x else empty for x in (lse, picked))
        entropy = torch.cat(entropy) if entropy else empty
        correct = torch.cat(correct) if correct else targets.new_zeros(0, dtype=torch.bool)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.compute_dtype, ctx.rows, ctx.inv_temperature = compute_dtype, rows, inv_temperature
        ctx.mark_non_differentiable(correct, entropy)
        return picked - lse, correct, entropy

    @staticmethod
    def backward(ctx, grad, grad_correct, grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        cdt, inv_t = ctx.compute_dtype, ctx.inv_temperature
        h, w = hidden.to(cdt), weight.to(cdt)
        b = bias.to(cdt) if bias is not None else None
        acc = lse.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None  # e.g. not for LoRA
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        for start in range(0, h.shape[0], ctx.rows):
            stop = start + ctx.rows
            logits = F.linear(h[start:stop], w, b).to(acc) * inv_t
            # d(logit_target - lse)/d logits = onehot(target) - softmax, times the incoming gradient and 1/T
            grad_logits = -(logits - lse[start:stop, None]).exp_() * grad[start:stop, None]
            grad_logits.scatter_add_(-1, targets[start:stop, None], grad[start:stop, None])
            grad_logits = grad_logits * inv_t
            if need_h:
                grad_h[start:stop] = (grad_logits.to(cdt) @ w).to(hidden.dtype)
            if need_w:  # the GEMM in the compute dtype, accumulated in fp32
                grad_w += (grad_logits.to(cdt).t() @ h[start:stop]).to(acc)
            if need_b:
                grad_b += grad_logits.sum(0)
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    budget: int = _LOGIT_BUDGET,
    temperature: float = 1.0,
    return_correct: bool = False,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``log_softmax((hidden @ weight.T + bias) / temperature)[i, targets[i]]``: the log-probability of each target
    token under an unembedding, without materialising the ``[M, V]`` logits or their fp32 log-softmax, forward or
    backward.

    Args:
        hidden: ``[M, H]`` final hidden states at the positions that predict ``targets``.
        weight: ``[V, H]`` unembedding (``lm_head.weight``); ``bias``: ``[V]`` or ``None``.
        targets: ``[M]`` token ids.
        budget: most logits elements computed at once.
        temperature: the sampling temperature the log-probs are for (on-policy methods sample with one).
        return_correct: also return ``[M]`` booleans: whether the target is the highest-scoring token (accuracy).
        return_entropy: also return ``[M]`` fp32 entropies of the distributions (no gradient).

    Returns:
        ``[M]`` fp32 log-probabilities (fp64 for fp64 inputs), followed by the requested extras. The matmul runs in
        the autocast dtype when autocast is on (else in the weight's dtype); the log-sum-exp always in fp32.
    """
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    rows = max(1, budget // weight.shape[0])
    with torch.autocast(device, enabled=False):
        logps, correct, entropy = _LinearLogProbs.apply(
            hidden, weight, bias, targets, dtype, rows, 1.0 / temperature, return_entropy
        )
    extras = [x for x, wanted in ((correct, return_correct), (entropy, return_entropy)) if wanted]
    return (logps, *extras) if extras else logps


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probabilities of ``labels`` under ``logits``.

    Args:
        logits: ``[B, T, V]``; position ``t`` predicts token ``t + 1``.
        labels: ``[B, T]`` with ``IGNORE_INDEX`` where no log-prob is wanted (prompt, padding).

    Returns:
        ``(logps, mask)``, both ``[B, T - 1]``: fp32 log-probs of ``labels[:, 1:]`` (0 where masked) and the boolean
        mask of the labelled positions.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logps = selective_log_softmax(logits[:, :-1], targets.masked_fill(~mask, 0))
    return logps.masked_fill(~mask, 0.0), mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each sequence's labelled tokens, ``log pi(y|x)``.

    Returns:
        ``(logps, n_tokens)``, both ``[B]``: the fp32 sum of labelled tokens' log-probs, and how many there were.
    """
    logps, mask = token_logps(logits, labels)
    return logps.sum(-1), mask.sum(-1)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy averaged over labelled tokens (the SFT objective).

    Returns:
        ``(loss, n_correct, n_tokens)``: the scalar fp32 mean negative log-likelihood, and for token accuracy the
        number of labelled tokens whose argmax prediction is right and the number of labelled tokens.
    """
    logps, mask = token_logps(logits, labels)
    n_tokens = mask.sum()
    loss = -logps.sum() / n_tokens.clamp(min=1)
    with torch.no_grad():
        correct = (logits[:, :-1].argmax(-1) == labels[:, 1:]) & mask
    return loss, correct.sum(), n_tokens


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Bradley-Terry pairwise loss of a reward model (Ouyang et al. 2022, eq. 1; Llama 2's optional margin).

    ``loss = -log sigmoid(r_chosen - r_rejected - margin)``, per pair, in fp32 whatever the input dtype; finite for
    any finite rewards (``logsigmoid`` never takes the log of an underflowed sigmoid).

    Args:
        chosen_rewards: ``[P]`` rewards of the preferred responses.
        rejected_rewards: ``[P]`` rewards of the other responses.
        margin: ``[P]`` or scalar margin the chosen reward should exceed the rejected by; ``None`` for none.

    Returns:
        ``[P]`` per-pair losses.
    """
    diff = chosen_rewards.float() - rejected_rewards.float()
    if margin is not None:
        diff = diff - torch.as_tensor(margin, dtype=torch.float32, device=diff.device)
    return -F.logsigmoid(diff)


def grouped_mean(values: torch.Tensor, group: torch.Tensor, n_groups: int | None = None) -> torch.Tensor:
    """Mean of ``values [P]`` within each group, ``group [P]`` holding group indices ``0..G-1``; returns ``[G]``
    (empty groups give 0)."""
    n_groups = int(group.max()) + 1 if n_groups is None else n_groups
    sums = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, group, values)
    counts = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(
        0, group, torch.ones_like(values)
    )
    return sums / counts.clamp(min=1)


def mean_over_groups(values: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """The mean over groups of each group's mean (``values [P]``, ``group [P]`` their group indices): every prompt
    weighs the same however many pairs it has. Groups without a value do not count; no values at all give 0."""
    if values.numel() == 0:
        return values.sum()
    counts = torch.zeros(int(group.max()) + 1, dtype=values.dtype, device=values.device).index_add_(
        0, group, torch.ones_like(values)
    )
    return grouped_mean(values, group, len(counts))[counts > 0].mean()


def kwise_bradley_terry_loss(
    rewards: torch.Tensor,
    better: torch.Tensor,
    worse: torch.Tensor,
    group: torch.Tensor,
    margin: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """InstructGPT's K-wise reward loss: each prompt's K ranked responses give all C(K, 2) pairs; the Bradley-Terry
    loss is averaged over a prompt's pairs, then over prompts, so every prompt weighs the same however large its K.

    Args:
        rewards: ``[N]`` one reward per response (each response forwarded once).
        better, worse: ``[P]`` indices into ``rewards`` of each pair's preferred and other response.
        group: ``[P]`` the prompt of each pair.

    Returns:
        the scalar loss.
    """
    return mean_over_groups(bradley_terry_loss(rewards[better], rewards[worse], margin), group)


# ----- direct preference optimisation --------------------------------------------------------------------------------
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "simpo",
)
REFERENCE_FREE_LOSS_TYPES = ("simpo",)


def check_dpo_options(
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    rpo_alpha: float | None = None,
) -> None:
    """Raise a ``ValueError`` naming the option unless the combination is one :func:`dpo_loss` computes: a known
    ``loss_type``, ``beta > 0``, ``label_smoothing`` only where the loss uses it (``sigmoid`` and ``simpo`` in
    ``[0, 0.5]``, ``robust`` in ``[0, 0.5)``, ``exo_pair`` in ``(0, 1)``: its loss takes ``log(eps)``),
    ``discopop_tau > 0``, ``rpo_alpha >= 0``."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {', '.join(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    eps = label_smoothing
    ranges = {"sigmoid": (0 <= eps <= 0.5, "[0, 0.5]"), "simpo": (0 <= eps <= 0.5, "[0, 0.5]"),
              "robust": (0 <= eps < 0.5, "[0, 0.5)"), "exo_pair": (0 < eps < 1, "(0, 1), e.g. 1e-3")}  # fmt: skip
    valid, expected = ranges.get(loss_type, (eps == 0, None))
    if not valid and expected is None:
        raise ValueError(f"label_smoothing={eps} is not used by loss_type {loss_type!r}; leave it at 0")
    if not valid:
        raise ValueError(f"loss_type {loss_type!r} needs label_smoothing in {expected}, got {eps}")
    if loss_type == "discopop" and not discopop_tau > 0:
        raise ValueError(f"discopop_tau must be positive, got {discopop_tau}")
    if rpo_alpha is not None and rpo_alpha < 0:
        raise ValueError(f"rpo_alpha must be >= 0, got {rpo_alpha}")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    simpo_gamma: float = 0.5,
    discopop_tau: float = 0.05,
    rpo_alpha: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO family of preference losses on summed response log-probabilities, in fp32 whatever the input dtype.

    With ``h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))``
    (Rafailov et al. 2023, eq. 7), the definitions follow TRL 1.16's ``DPOTrainer``:

    - ``sigmoid`` (DPO): ``-log sigmoid(beta h)``; with ``label_smoothing = eps > 0`` conservative DPO (cDPO):
      ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
    - ``hinge`` (SLiC, Zhao et al. 2023): ``relu(1 - beta h)``.
    - ``ipo`` (Azar et al. 2023, eq. 17): ``(h' - 1 / (2 beta))^2`` with ``h'`` the per-token (length-normalised)
      log-ratio difference.
    - ``robust`` (rDPO, Chowdhury et al. 2024): the cDPO terms, de-biased by ``1 / (1 - 2 eps)``.
    - ``exo_pair`` (Ji et al. 2024, eq. 16): reverse KL from ``softmax(beta h)`` to ``(1 - eps, eps)``;
      needs ``eps > 0``.
    - ``nca_pair`` (Chen et al. 2024), ``bco_pair`` (Jung et al. 2024, without the running reward shift),
      ``sppo_hard`` (Wu et al. 2024), ``apo_zero`` / ``apo_down`` (D'Oosterlinck et al. 2024, eqs. 7-8),
      ``discopop`` (Chan et al. 2024, eq. 5, temperature ``discopop_tau``), ``sigmoid_norm`` (``sigmoid`` on
      length-normalised log-ratios).
    - ``simpo`` (Meng et al. 2024, reference-free): ``-log sigmoid(beta (avg log pi(y_w) - avg log pi(y_l)) - gamma)``
      on per-token average log-probs, target margin ``simpo_gamma``; cDPO-style ``label_smoothing`` as in TRL's CPO.

    ``rpo_alpha`` adds ``rpo_alpha`` times the chosen response's per-token negative log-likelihood (RPO, Pang et al.
    2024), averaged per example so that the loss does not depend on how examples are grouped into batches.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[P]`` summed log-probs of each pair's responses under the policy.
        ref_chosen_logps, ref_rejected_logps: ``[P]`` the same under the reference; ``None`` for ``simpo``.
        chosen_lengths, rejected_lengths: ``[P]`` response token counts; needed by ``ipo``, ``sigmoid_norm``,
            ``simpo`` and ``rpo_alpha``.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[P]`` fp32: per-pair losses, and the detached implicit
        rewards ``beta (log pi - log pi_ref)`` (``beta`` times the average log-prob for ``simpo``).
    """
    check_dpo_options(loss_type, beta, label_smoothing, discopop_tau, rpo_alpha)
    needs_lengths = loss_type in ("ipo", "sigmoid_norm", "simpo") or rpo_alpha
    if needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss_type {loss_type!r} (or rpo_alpha) needs chosen_lengths and rejected_lengths")
    chosen, rejected = policy_chosen_logps.float(), policy_rejected_logps.float()
    if chosen_lengths is not None:
        chosen_n = chosen_lengths.to(chosen.device, torch.float32).clamp(min=1)
        rejected_n = rejected_lengths.to(chosen.device, torch.float32).clamp(min=1)
    eps = label_smoothing

    if loss_type in REFERENCE_FREE_LOSS_TYPES:
        chosen_avg, rejected_avg = chosen / chosen_n, rejected / rejected_n
        logits = beta * (chosen_avg - rejected_avg) - simpo_gamma
        losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
        chosen_rewards, rejected_rewards = beta * chosen_avg, beta * rejected_avg
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"loss_type {loss_type!r} needs reference log-probs")
        chosen_ratio = chosen - ref_chosen_logps.float()
        rejected_ratio = rejected - ref_rejected_logps.float()
        delta = chosen_ratio - rejected_ratio
        chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
        if loss_type == "sigmoid":
            losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
        elif loss_type == "hinge":
            losses = torch.relu(1 - beta * delta)
        elif loss_type == "ipo":
            losses = (chosen_ratio / chosen_n - rejected_ratio / rejected_n - 1 / (2 * beta)) ** 2
        elif loss_type == "robust":
            losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
        elif loss_type == "exo_pair":
            logits = beta * delta
            losses = torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-eps)) + torch.sigmoid(-logits) * (
                F.logsigmoid(-logits) - math.log(eps)
            )
        elif loss_type == "nca_pair":
            losses = (
                -F.logsigmoid(chosen_rewards)
                - 0.5 * F.logsigmoid(-chosen_rewards)
                - 0.5 * F.logsigmoid(-rejected_rewards)
            )
        elif loss_type == "bco_pair":
            losses = -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)
        elif loss_type == "sppo_hard":
            losses = (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
        elif loss_type == "apo_zero":
            losses = 1 - torch.sigmoid(chosen_rewards) + torch.sigmoid(rejected_rewards)
        elif loss_type == "apo_down":
            losses = torch.sigmoid(chosen_rewards) + 1 - torch.sigmoid(beta * delta)
        elif loss_type == "discopop":
            logits = beta * delta
            modulation = torch.sigmoid(logits / discopop_tau)
            # exp(-logits) * modulation, in log space: never inf * 0 for very negative logits
            exp_term = torch.exp(-logits + F.logsigmoid(logits / discopop_tau))
            losses = -F.logsigmoid(logits) * (1 - modulation) + exp_term
        else:  # sigmoid_norm
            losses = -F.logsigmoid(beta * (chosen_ratio / chosen_n - rejected_ratio / rejected_n))
    if rpo_alpha:
        losses = losses + rpo_alpha * (-chosen / chosen_n)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


# ----- PPO (InstructGPT step 3) -----------------------------------------------------------------------------------
def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from log-probs of tokens sampled from ``pi`` (Schulman 2020,
    "Approximating KL divergence").

    ``k1``: ``log pi - log pi_ref`` (unbiased, can be negative; InstructGPT's per-token penalty);
    ``k3``: ``(r - 1) - log r`` with ``r = pi_ref / pi`` (unbiased, never negative, lower variance).

    Args:
        logps, ref_logps: ``[B, T]`` log-probs of the sampled tokens under the policy and the reference.

    Returns:
        ``[B, T]`` fp32 estimates (mask them with the response mask).
    """
    log_ratio = logps.float() - ref_logps.float()
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; choose 'k1' or 'k3'")


def whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``values`` normalised to zero mean and unit variance over the positions where ``mask`` is true (the mean is
    added back if ``shift_mean`` is false). Masked positions are returned as 0. ``moments`` ``(mean, variance)``
    replace this batch's (under data parallelism: those of every rank's values, so that each rank normalises as one
    device with the whole batch would)."""
    mask = mask.to(values.dtype)
    if moments is None:
        mean = masked_mean(values, mask)
        moments = (mean, masked_mean((values - mean) ** 2, mask))
    mean, var = moments
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over response tokens.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = delta_t + gamma lam A_{t+1}``, with ``V`` and ``A`` zero past
    the last real token of each row. Rows may have different lengths (``mask`` right-padded with 0).

    Args:
        rewards, values: ``[B, T]`` per-token rewards and value estimates.
        mask: ``[B, T]`` 1 on response tokens.

    Returns:
        ``(advantages, returns)``, both ``[B, T]`` fp32 and 0 where masked; ``returns = advantages + values``.
    """
    mask = mask.float()
    rewards, values = rewards.float() * mask, values.float() * mask
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t] * mask[:, t] + next_value * (1 - mask[:, t])  # padding keeps the next real value
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    n_tokens: torch.Tensor | float | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), averaged over response tokens.

    ``-min(ratio A, clip(ratio, 1 - eps, 1 + eps) A)`` with ``ratio = exp(log pi - log pi_old)``, summed over the
    response tokens and divided by ``n_tokens`` (default: this batch's count; under data parallelism the global
    mini-batch's count divided by the number of ranks, so that the ranks' averaged gradients are the global mean's).
    ``token_weights`` ``[B, T]`` multiply each token's surrogate (:func:`truncated_importance_weights`).

    Returns:
        ``(loss, clip_fraction, approx_kl)``: the scalar fp32 loss; the fraction of tokens whose ratio was clipped
        (where the clipped term was the smaller); and ``mean((ratio - 1) - log ratio)`` (k3 estimate of
        ``KL(pi_old || pi)``), both detached.
    """
    log_ratio = logps.float() - old_logps.float()
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if token_weights is not None:
        per_token = per_token * token_weights
    loss = _token_mean(per_token, mask, n_tokens)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped < unclipped).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clip_fraction, approx_kl


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    n_tokens: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (as in OpenAI's PPO baselines and InstructGPT's setup): the larger of the squared errors
    of the new value and of the old value moved at most ``clip_eps``, halved and averaged over response tokens
    (divided by ``n_tokens`` as in :func:`ppo_policy_loss`).

    Returns:
        ``(loss, clip_fraction)``: the scalar fp32 loss and the fraction of tokens where the clipped error was used.
    """
    values = values.float()
    clipped = old_values.float() + (values - old_values.float()).clamp(-clip_eps, clip_eps)
    error, clipped_error = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * _token_mean(torch.maximum(error, clipped_error), mask, n_tokens)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_error > error).float(), mask)
    return loss, clip_fraction


# ----- GRPO (DeepSeekMath) ----------------------------------------------------------------------------------------
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def grpo_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4,
    batch_std: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath sec. 4.1.2, outcome supervision): each completion's
    reward minus the mean reward of the completions sampled for the same prompt, divided by a standard deviation.

    Args:
        rewards: ``[N]`` rewards, ``N = B * group_size``, the ``group_size`` completions of a prompt consecutive.
        group_size: completions per prompt (``G``).
        scale: ``"group"`` (the group's standard deviation, the paper), ``"batch"`` (the standard deviation of all
            ``N`` rewards, more robust when a group's rewards are nearly equal), or ``"none"`` (no division, Dr. GRPO,
            Liu et al. 2025, which removes the difficulty bias of the division).
        eps: added to the standard deviation (it keeps the division finite for nearly equal rewards).
        batch_std: the standard deviation for ``"batch"``; by default that of ``rewards`` (under data parallelism pass
            the one over every device's rewards).

    Returns:
        ``(advantages [N], zero_std [N])``: fp32 advantages, and whether the group's rewards were all equal (such a
        group carries no learning signal, and its advantages are exactly 0 under every ``scale``: its mean is not
        subtracted in floating point, where one ulp divided by a tiny standard deviation would be a gradient).
        Computed in fp64. Standard deviations are the unbiased (``N - 1``) estimate, as TRL's.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [B * group_size] with group_size={group_size}; got {tuple(rewards.shape)}")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"unknown advantage scale {scale!r}; choose 'group', 'batch' or 'none'")
    grouped = rewards.double().view(-1, group_size)
    flat = (grouped == grouped[:, :1]).all(-1, keepdim=True)  # exactly equal rewards: no signal
    centred = (grouped - grouped.mean(-1, keepdim=True)).masked_fill(flat, 0.0)
    if scale == "group":
        std = grouped.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        centred = centred / (std + eps)
    elif scale == "batch":
        if batch_std is None:
            batch_std = rewards.double().std() if rewards.numel() > 1 else rewards.new_zeros((), dtype=torch.float64)
        centred = centred / (batch_std.double() + eps)
    return centred.float().view(-1), flat.expand_as(grouped).reshape(-1)


def grpo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    n_tokens: torch.Tensor | float | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's objective (Shao et al. 2024, eq. 3), as a loss to minimise: per token,
    ``-min(ratio A, clip(ratio, 1 - eps, 1 + eps_high) A) + kl_coef KL_k3(pi || pi_ref)`` with
    ``ratio = pi / pi_old`` and the unbiased, non-negative ``k3`` estimator
    ``pi_ref / pi - log(pi_ref / pi) - 1`` (eq. 4), aggregated over tokens by ``loss_type``:

    - ``"grpo"``: each completion's mean over its tokens, then the mean over completions (the paper; longer
      completions weigh less per token);
    - ``"bnpo"``: the mean over all tokens of the batch;
    - ``"dapo"``: the sum over tokens divided by ``n_tokens`` (DAPO, Yu et al. 2025: the generation batch's token
      count over all devices, divided by the number of devices and of optimizer steps it is split into, as TRL
      divides; defaults to this batch's count);
    - ``"dr_grpo"``: the sum divided by ``completions x max_completion_length`` (Dr. GRPO, Liu et al. 2025: a
      constant, so no length bias).

    Args:
        logps: ``[N, R]`` log-probs of the completion tokens under the policy being trained.
        old_logps: ``[N, R]`` log-probs when sampled (``None``: one update per generation, so ``pi_old = pi`` and the
            ratio is ``exp(logps - logps.detach())``: 1, with the policy gradient as its gradient).
        advantages: ``[N]`` per-completion (or ``[N, R]`` per-token) advantages.
        mask: ``[N, R]`` 1 on completion tokens.
        ref_logps: ``[N, R]`` reference log-probs (needed when ``kl_coef`` is not 0).
        kl_coef: the KL coefficient (the paper's beta).
        clip_eps, clip_eps_high: the ratio's lower and upper clip (``clip_eps_high`` defaults to ``clip_eps``; DAPO's
            "clip-higher" sets it larger).
        loss_type: the token aggregation above.
        max_completion_length: ``R_max`` for ``"dr_grpo"``.
        n_tokens: the normaliser for ``"dapo"`` (see above).
        token_weights: ``[N, R]`` weights of each token's surrogate, before the KL term is added (truncated importance
            sampling against the sampler, :func:`truncated_importance_weights`, as TRL applies it).

    Returns:
        ``(loss, stats)``: the scalar fp32 loss and detached per-token means: ``kl`` (the k3 estimate, 0 without a
        reference), ``clip_low`` / ``clip_high`` (fraction of tokens whose ratio was clipped where it mattered:
        below ``1 - eps`` with a negative advantage, above ``1 + eps_high`` with a positive one).
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; choose one of {GRPO_LOSS_TYPES}")
    logps = logps.float()
    mask = mask.to(logps.dtype)
    advantages = advantages.float()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    old = logps.detach() if old_logps is None else old_logps.float()
    ratio = torch.exp(logps - old)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    per_token = -torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + high) * advantages)
    if token_weights is not None:
        per_token = per_token * token_weights
    kl = torch.zeros_like(logps)
    if kl_coef != 0.0:
        if ref_logps is None:
            raise ValueError("kl_coef != 0 needs ref_logps")
        kl = kl_penalty(logps, ref_logps, "k3")
        per_token = per_token + kl_coef * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    elif loss_type == "dapo":
        normaliser = mask.sum() if n_tokens is None else torch.as_tensor(n_tokens, dtype=logps.dtype)
        loss = (per_token * mask).sum() / normaliser.clamp(min=1)
    else:
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
        loss = (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)
    with torch.no_grad():
        stats = {
            "kl": masked_mean(kl, mask),
            "clip_low": masked_mean(((ratio < 1 - clip_eps) & (advantages < 0)).float(), mask),
            "clip_high": masked_mean(((ratio > 1 + high) & (advantages > 0)).float(), mask),
        }
    return loss, stats


def truncated_importance_weights(
    logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, cap: float = 2.0
) -> torch.Tensor:
    """Truncated importance sampling (TIS; Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"): a sampling engine's probabilities differ from the trainer's (other kernels, lower
    precision), so the tokens it sampled are weighted by ``min(pi_trainer / pi_sampler, cap)``, per token, as verl
    and TRL's ``token_truncate`` apply it.

    Args:
        logps: ``[N, R]`` the trainer's log-probs of the sampled tokens under the policy that sampled them.
        sampler_logps: ``[N, R]`` the sampling engine's log-probs of the same tokens.
        mask: ``[N, R]`` 1 on completion tokens.
        cap: the largest weight.

    Returns:
        ``[N, R]`` detached weights, 1 outside ``mask``.
    """
    ratio = torch.exp(logps.detach().float() - sampler_logps.float()).clamp(max=cap)
    return torch.where(mask.bool(), ratio, torch.ones_like(ratio))
