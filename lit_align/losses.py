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
    "orpo",
)
REFERENCE_FREE_LOSS_TYPES = ("simpo", "orpo")


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


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, without cancellation (Maechler 2012: ``log(-expm1(x))`` near 0,
    ``log1p(-exp(x))`` below ``-ln 2``)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds_ratio(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """ORPO's log odds ratio (Hong et al. 2024, eqs. 4 and 7): with ``P = exp(avg log-prob)`` per response,
    ``log odds(y_w) - log odds(y_l) = (a_w - a_l) - (log(1 - e^a_w) - log(1 - e^a_l))``.

    Args:
        chosen_avg_logps, rejected_avg_logps: ``[P]`` per-token average log-probs (``< 0``) of each pair's responses.

    Returns:
        ``(log_odds, log_sigmoid_log_odds)``, each ``[P]`` fp32; the second is minus the odds-ratio loss. Average
        log-probs are capped at ``-1e-6`` (fp32 log-softmax returns exactly 0 for a certain token, where
        ``log(1 - e^0)`` is ``-inf`` and the gradient NaN).
    """
    chosen, rejected = chosen_avg_logps.float().clamp(max=-1e-6), rejected_avg_logps.float().clamp(max=-1e-6)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return log_odds, F.logsigmoid(log_odds)


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
    - ``orpo`` (Hong et al. 2024, eq. 6, reference-free): the chosen response's per-token NLL plus ``beta`` (the
      paper's lambda) times the odds-ratio loss ``-log sigmoid(log odds(y_w) - log odds(y_l))``, with
      ``odds(y) = P(y) / (1 - P(y))`` and ``P`` the per-token average probability (:func:`orpo_log_odds_ratio`).
      The NLL is averaged per example (TRL averages it over the batch's chosen tokens: the same when the chosen
      responses have equal lengths), so that the loss does not depend on how examples are batched.

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
    needs_lengths = loss_type in ("ipo", "sigmoid_norm", "simpo", "orpo") or rpo_alpha
    if needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss_type {loss_type!r} (or rpo_alpha) needs chosen_lengths and rejected_lengths")
    chosen, rejected = policy_chosen_logps.float(), policy_rejected_logps.float()
    if chosen_lengths is not None:
        chosen_n = chosen_lengths.to(chosen.device, torch.float32).clamp(min=1)
        rejected_n = rejected_lengths.to(chosen.device, torch.float32).clamp(min=1)
    eps = label_smoothing

    if loss_type in REFERENCE_FREE_LOSS_TYPES:
        chosen_avg, rejected_avg = chosen / chosen_n, rejected / rejected_n
        if loss_type == "orpo":
            losses = -chosen_avg - beta * orpo_log_odds_ratio(chosen_avg, rejected_avg)[1]
        else:
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
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "sequence_sum")
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_pp")


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


def rloo_advantages(
    rewards: torch.Tensor, group_size: int, normalize: bool = False, eps: float = 1e-4,
    batch_std: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024, eq. 5): each completion's reward
    minus the mean reward of the *other* completions of its prompt, ``A_i = r_i - (sum_j r_j - r_i) / (G - 1)``
    (``= G / (G - 1) (r_i - mean(r))``: an unbiased baseline, since it does not depend on completion ``i``).

    Args:
        rewards: ``[N]`` rewards, ``N = B * group_size``, the ``group_size`` completions of a prompt consecutive.
        group_size: completions per prompt (``G >= 2``).
        normalize: divide by the standard deviation of all ``N`` advantages (TRL's ``normalize_advantages``; their
            mean is 0 by construction).
        eps: added to that standard deviation.
        batch_std: that standard deviation over every device's advantages (under data parallelism), else this
            batch's.

    Returns:
        ``(advantages [N], zero_std [N])`` as :func:`grpo_advantages`: fp32, computed in fp64, exactly 0 for a group
        whose rewards are all equal.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [B * group_size] with group_size={group_size}; got {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"leave-one-out baselines need group_size >= 2, got {group_size}")
    grouped = rewards.double().view(-1, group_size)
    flat = (grouped == grouped[:, :1]).all(-1, keepdim=True)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)
    advantages = (grouped - baseline).masked_fill(flat, 0.0)
    if normalize:
        if batch_std is None:
            batch_std = advantages.std() if advantages.numel() > 1 else advantages.new_zeros(())
        advantages = advantages / (batch_std.double() + eps)
    return advantages.float().view(-1), flat.expand_as(grouped).reshape(-1)


def reinforce_pp_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-4, batch_std: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ with a group baseline (Hu et al. 2025, "REINFORCE++", sec. 3, the ``-baseline`` variant): each
    completion's reward minus its group's mean, then divided by the standard deviation of those centred rewards over
    the whole batch (global, not per-group, normalisation: no per-prompt difficulty weighting). Statistics are per
    completion (verl's ``masked_whiten`` weighs them by token count and re-centres; the group centring makes the
    batch mean 0 here already).

    Args:
        rewards: ``[N]`` rewards, ``N = B * group_size``, a prompt's completions consecutive.
        group_size: completions per prompt (1: no group baseline, the batch mean is subtracted instead).
        eps: added to the standard deviation.
        batch_std: the standard deviation of the centred rewards over every device (under data parallelism).

    Returns:
        ``(advantages [N], zero_std [N])`` as :func:`grpo_advantages`.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [B * group_size] with group_size={group_size}; got {tuple(rewards.shape)}")
    grouped = rewards.double().view(-1, group_size)
    if group_size == 1:
        grouped = rewards.double().view(1, -1)
    flat = (grouped == grouped[:, :1]).all(-1, keepdim=True)
    centred = (grouped - grouped.mean(-1, keepdim=True)).masked_fill(flat, 0.0)
    if batch_std is None:
        batch_std = centred.std() if centred.numel() > 1 else centred.new_zeros(())
    advantages = centred / (batch_std.double() + eps)
    return advantages.float().reshape(-1), flat.expand_as(grouped).reshape(-1)


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
    importance_sampling_level: str = "token",
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
        importance_sampling_level: what the clipped ratio is a ratio of. ``"token"``: each token's (GRPO, PPO).
            ``"sequence"``: GSPO (Zheng et al. 2025, eq. 7), one ratio per completion, the geometric mean of its
            tokens' ratios ``exp(mean_t (log pi - log pi_old))``, clipped as a whole (with GSPO's small clip ranges,
            e.g. ``clip_eps=3e-4``, ``clip_eps_high=4e-4``), as TRL's ``importance_sampling_level="sequence"``.
            ``"sequence_sum"``: the completion's whole probability ratio ``exp(sum_t (log pi - log pi_old))``, the
            REINFORCE/RLOO objective as TRL's ``RLOOTrainer`` computes it. Both sequence levels weigh each completion
            once, so they take ``loss_type="grpo"`` (the mean over completions).

    Returns:
        ``(loss, stats)``: the scalar fp32 loss and detached per-token means: ``kl`` (the k3 estimate, 0 without a
        reference), ``clip_low`` / ``clip_high`` (fraction of tokens whose ratio was clipped where it mattered:
        below ``1 - eps`` with a negative advantage, above ``1 + eps_high`` with a positive one).
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; choose one of {GRPO_LOSS_TYPES}")
    check_importance_sampling(importance_sampling_level, loss_type)
    logps = logps.float()
    mask = mask.to(logps.dtype)
    advantages = advantages.float()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    old = logps.detach() if old_logps is None else old_logps.float()
    log_ratio = logps - old
    if importance_sampling_level == "sequence":
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    elif importance_sampling_level == "sequence_sum":  # capped: exp of a long sum overflows to inf, and inf * 0 = NaN
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True).clamp(max=20.0)
    ratio = torch.exp(log_ratio)  # [N, R] per token, [N, 1] per completion
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
            "clip_low": masked_mean(((ratio < 1 - clip_eps) & (advantages < 0)).float().expand_as(mask), mask),
            "clip_high": masked_mean(((ratio > 1 + high) & (advantages > 0)).float().expand_as(mask), mask),
        }
    return loss, stats


def check_importance_sampling(level: str, loss_type: str) -> None:
    """Raise a ``ValueError`` naming the option unless ``level`` is one of :data:`IMPORTANCE_SAMPLING_LEVELS` that
    fits ``loss_type`` (the sequence levels give one term per completion: ``loss_type="grpo"``)."""
    if level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"unknown importance_sampling_level {level!r}; choose one of {IMPORTANCE_SAMPLING_LEVELS}")
    if level != "token" and loss_type != "grpo":
        raise ValueError(
            f"importance_sampling_level={level!r} gives one ratio per completion, weighed once: it needs "
            f"loss_type='grpo' (the mean over completions), not {loss_type!r}"
        )


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


# ----- on-policy distillation (GKD) -------------------------------------------------------------------------------
def _check_jsd_options(beta: float, temperature: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta!r}: must be in [0, 1] (0: forward KL(teacher || student), 1: reverse KL)")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: must be positive")


def _jsd_terms(student_logps: torch.Tensor, teacher_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """``[..., V]`` per-vocabulary-entry terms of the generalized JSD of two log-distributions (summed over ``V``
    they give the divergence; see :func:`generalized_jsd`)."""
    if beta == 0.0:
        return teacher_logps.exp() * (teacher_logps - student_logps)
    if beta == 1.0:
        return student_logps.exp() * (student_logps - teacher_logps)
    log_m = torch.logaddexp(student_logps + math.log1p(-beta), teacher_logps + math.log(beta))
    return beta * teacher_logps.exp() * (teacher_logps - log_m) + (1 - beta) * student_logps.exp() * (
        student_logps - log_m
    )


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5, temperature: float = 1.0
) -> torch.Tensor:
    """The generalized Jensen-Shannon divergence between the student's and the teacher's next-token distributions
    at each position (GKD: Agarwal et al. 2024, "On-Policy Distillation of Language Models", eq. 1):

    ``D_beta(p_T || p_S) = beta KL(p_T || M) + (1 - beta) KL(p_S || M)``, ``M = beta p_T + (1 - beta) p_S``,

    with ``p = softmax(logits / temperature)``. As TRL defines it (``GKDTrainer.generalized_jsd_loss`` and
    ``DistillationTrainer``), ``beta = 0`` is the forward ``KL(p_T || p_S)`` and ``beta = 1`` the reverse
    ``KL(p_S || p_T)``; in between the interpolation, symmetric JSD at 0.5.

    Args:
        student_logits, teacher_logits: ``[..., V]`` logits of the two models at the same positions.
        beta: in ``[0, 1]``.
        temperature: both distributions are softened by it.

    Returns:
        ``[...]`` divergences in nats, in fp32 (fp64 for fp64 logits).
    """
    _check_jsd_options(beta, temperature)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student_logps = torch.log_softmax(student_logits.to(dtype) / temperature, -1)
    teacher_logps = torch.log_softmax(teacher_logits.to(dtype) / temperature, -1)
    return _jsd_terms(student_logps, teacher_logps, beta).sum(-1)


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    n_tokens: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """GKD's loss on materialised logits (TRL 1.16's ``GKDTrainer.generalized_jsd_loss``, reduction for reduction):
    the per-entry terms of :func:`generalized_jsd` at the positions whose ``labels`` are not ``IGNORE_INDEX``.

    Args:
        student_logits, teacher_logits: ``[B, T, V]`` (already shifted: position ``t`` predicts ``labels[:, t]``).
        labels: ``[B, T]`` with ``IGNORE_INDEX`` where no loss is taken; ``None``: every position.
        beta, temperature: as :func:`generalized_jsd`.
        reduction: ``"batchmean"`` (the sum over labelled positions and the vocabulary divided by the number of
            labelled positions, or by ``B`` without labels: the mean per-token divergence), ``"sum"``, ``"mean"``
            (over positions and vocabulary entries) or ``"none"`` (the ``[M, V]`` terms, ``[B, T, V]`` without
            labels).
        n_tokens: when given, the sum divided by it instead (a global token count, as TRL's
            ``num_items_in_batch``).

    Returns:
        A scalar (or the unreduced terms), fp32 or fp64 as :func:`generalized_jsd`.
    """
    if reduction not in ("batchmean", "sum", "mean", "none"):
        raise ValueError(f"reduction={reduction!r}: must be 'batchmean', 'sum', 'mean' or 'none'")
    _check_jsd_options(beta, temperature)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student_logps = torch.log_softmax(student_logits.to(dtype) / temperature, -1)
    teacher_logps = torch.log_softmax(teacher_logits.to(dtype) / temperature, -1)
    terms = _jsd_terms(student_logps, teacher_logps, beta)
    mask = None
    if labels is not None:
        mask = labels != IGNORE_INDEX
        terms = terms[mask]
    if n_tokens is not None:
        return terms.sum() / torch.as_tensor(n_tokens, dtype=terms.dtype, device=terms.device)
    if reduction == "batchmean":
        return terms.sum() / (mask.sum().clamp(min=1) if mask is not None else max(terms.shape[0], 1))
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean":
        return terms.mean()
    return terms


class _LinearGeneralizedJSD(torch.autograd.Function):
    """Per-row :func:`generalized_jsd` of ``student_hidden @ student_weight.T (+ bias)`` against the teacher's
    ``teacher_hidden @ teacher_weight.T (+ bias)``, a tile of rows at a time; the backward recomputes each tile's
    logits, so only ``[M]`` statistics (both log-sum-exps and one KL) are kept between the passes. The gradient
    flows to the student's hidden states, weight and bias; the teacher gets none."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, beta, inv_t, rows, dtypes):
        s_dtype, t_dtype = dtypes
        acc = torch.promote_types(torch.promote_types(s_dtype, t_dtype), torch.float32)
        div, lse_s, lse_t, aux = [], [], [], []
        ws, bs = w_s.to(s_dtype), b_s.to(s_dtype) if b_s is not None else None
        wt, bt = w_t.to(t_dtype), b_t.to(t_dtype) if b_t is not None else None
        for start in range(0, h_s.shape[0], rows):
            zs = F.linear(h_s[start : start + rows].to(s_dtype), ws, bs).to(acc) * inv_t
            zt = F.linear(h_t[start : start + rows].to(t_dtype), wt, bt).to(acc) * inv_t
            tile_lse_s, tile_lse_t = torch.logsumexp(zs, -1), torch.logsumexp(zt, -1)
            log_ps, log_pt = zs - tile_lse_s[:, None], zt - tile_lse_t[:, None]
            del zs, zt
            if beta == 0.0 or beta == 1.0:
                tile_div = _jsd_terms(log_ps, log_pt, beta).sum(-1)
                aux.append(tile_div)
            else:
                log_m = torch.logaddexp(log_ps + math.log1p(-beta), log_pt + math.log(beta))
                kl_s = (log_ps.exp() * (log_ps - log_m)).sum(-1)
                kl_t = (log_pt.exp() * (log_pt - log_m)).sum(-1)
                tile_div = beta * kl_t + (1 - beta) * kl_s
                aux.append(kl_s)  # KL(p_S || M), which the gradient needs
            div.append(tile_div)
            lse_s.append(tile_lse_s)
            lse_t.append(tile_lse_t)
        empty = h_s.new_zeros(0, dtype=acc)
        div, lse_s, lse_t, aux = (torch.cat(x) if x else empty for x in (div, lse_s, lse_t, aux))
        ctx.save_for_backward(h_s, w_s, b_s, h_t, w_t, b_t, lse_s, lse_t, aux)
        ctx.beta, ctx.inv_t, ctx.rows, ctx.dtypes = beta, inv_t, rows, dtypes
        return div

    @staticmethod
    def backward(ctx, grad):
        h_s, w_s, b_s, h_t, w_t, b_t, lse_s, lse_t, aux = ctx.saved_tensors
        (s_dtype, t_dtype), beta, inv_t, acc = ctx.dtypes, ctx.beta, ctx.inv_t, lse_s.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = b_s is not None and ctx.needs_input_grad[2]
        ws, bs = w_s.to(s_dtype), b_s.to(s_dtype) if b_s is not None else None
        wt, bt = w_t.to(t_dtype), b_t.to(t_dtype) if b_t is not None else None
        grad_h = torch.empty_like(h_s) if need_h else None
        grad_w = torch.zeros(w_s.shape, dtype=acc, device=w_s.device) if need_w else None
        grad_b = torch.zeros(w_s.shape[0], dtype=acc, device=w_s.device) if need_b else None
        for start in range(0, h_s.shape[0], ctx.rows):
            stop = start + ctx.rows
            hs = h_s[start:stop].to(s_dtype)
            log_ps = F.linear(hs, ws, bs).to(acc) * inv_t - lse_s[start:stop, None]
            log_pt = F.linear(h_t[start:stop].to(t_dtype), wt, bt).to(acc) * inv_t - lse_t[start:stop, None]
            # d D / d z_S (z: the tempered logits) for each divergence; p_S (g - E_pS[g]) with g = dD/dp_S
            if beta == 0.0:
                grad_z = log_ps.exp() - log_pt.exp()
            elif beta == 1.0:
                grad_z = log_ps.exp() * (log_ps - log_pt - aux[start:stop, None])
            else:
                log_m = torch.logaddexp(log_ps + math.log1p(-beta), log_pt + math.log(beta))
                grad_z = (1 - beta) * log_ps.exp() * (log_ps - log_m - aux[start:stop, None])
            grad_z = grad_z * (grad[start:stop, None].to(acc) * inv_t)
            if need_h:
                grad_h[start:stop] = (grad_z.to(s_dtype) @ ws).to(h_s.dtype)
            if need_w:
                grad_w += (grad_z.to(s_dtype).t() @ hs).to(acc)
            if need_b:
                grad_b += grad_z.sum(0)
        grad_w = grad_w.to(w_s.dtype) if need_w else None
        grad_b = grad_b.to(b_s.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def linear_generalized_jsd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    budget: int = _LOGIT_BUDGET,
) -> torch.Tensor:
    """:func:`generalized_jsd` of the student's and the teacher's next-token distributions computed from their final
    hidden states and unembeddings, without materialising either model's ``[M, V]`` logits, forward or backward:
    rows are taken a tile at a time (both models' tiles together hold at most ``budget`` logits) and the backward
    recomputes each tile. What GKD's loss needs per completion token, with a vocabulary of any size.

    Args:
        student_hidden: ``[M, H_S]`` the student's final hidden states at the positions that predict the tokens.
        student_weight: ``[V, H_S]`` its unembedding (``lm_head.weight``); ``student_bias``: ``[V]`` or ``None``.
        teacher_hidden: ``[M, H_T]`` the teacher's, at the same positions (its width may differ).
        teacher_weight: ``[V, H_T]`` its unembedding (the same vocabulary); ``teacher_bias``: ``[V]`` or ``None``.
        beta, temperature: as :func:`generalized_jsd`.
        budget: most logits elements (both models together) computed at once.

    Returns:
        ``[M]`` divergences in nats, fp32 (fp64 for fp64 inputs). Differentiable with respect to the student's
        hidden states, weight and bias; the teacher receives no gradient. Each matmul runs in the autocast dtype when
        autocast is on (else in its weight's dtype); the softmaxes in fp32.
    """
    _check_jsd_options(beta, temperature)
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"the student's unembedding has {student_weight.shape[0]} rows and the teacher's {teacher_weight.shape[0]}:"
            " distillation compares next-token distributions over one shared vocabulary"
        )
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"{student_hidden.shape[0]} student positions but {teacher_hidden.shape[0]} teacher positions")
    device = student_hidden.device.type
    autocast = torch.is_autocast_enabled(device)
    dtypes = tuple(torch.get_autocast_dtype(device) if autocast else w.dtype for w in (student_weight, teacher_weight))
    rows = max(1, budget // (2 * student_weight.shape[0]))
    with torch.autocast(device, enabled=False):
        return _LinearGeneralizedJSD.apply(
            student_hidden, student_weight, student_bias, teacher_hidden.detach(), teacher_weight.detach(),
            None if teacher_bias is None else teacher_bias.detach(), float(beta), 1.0 / temperature, rows, dtypes,
        )  # fmt: skip


# ----- online DPO (Guo et al. 2024) -----------------------------------------------------------------------------------
ONLINE_DPO_TIES = ("skip", "keep")


def score_pairs(rewards: torch.Tensor, group_size: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each prompt's preference pair from its scored samples (online AI feedback, Guo et al. 2024, sec. 3: the
    annotator prefers the higher-scored of two responses): the chosen one is the first sample with the group's highest
    score, the rejected one the last with its lowest. For two samples this is TRL 1.16's ``OnlineDPOTrainer``'s rule
    (the first is chosen when ``r_1 >= r_2``), a tie included; the two are always different samples.

    Args:
        rewards: ``[N]`` scores, ``N = B * group_size``, the ``group_size`` samples of a prompt consecutive.
        group_size: samples per prompt (at least 2).

    Returns:
        ``(chosen, rejected, tie)``, each ``[B]``: the indices into ``rewards`` of each prompt's chosen and rejected
        sample, and whether all its samples scored the same (no preference: the pair carries no signal).
    """
    if group_size < 2 or rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be [B * group_size] with group_size={group_size} >= 2; got {tuple(rewards.shape)}"
        )
    if not torch.isfinite(rewards).all():  # argmax and argmin would both pick the NaN: a sample against itself
        raise ValueError(f"cannot rank samples with non-finite rewards: {rewards.tolist()}")
    grouped = rewards.view(-1, group_size)
    offsets = torch.arange(0, rewards.numel(), group_size, device=rewards.device)
    chosen = grouped.argmax(-1)  # the first maximum (torch.argmax's documented rule)
    rejected = group_size - 1 - grouped.flip(-1).argmin(-1)  # the last minimum
    tie = grouped.max(-1).values == grouped.min(-1).values
    return offsets + chosen, offsets + rejected, tie


def online_dpo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    rewards: torch.Tensor,
    lengths: torch.Tensor,
    group_size: int = 2,
    ties: str = "skip",
    n_pairs: torch.Tensor | float | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    discopop_tau: float = 0.05,
    rpo_alpha: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", algorithm 1): the
    samples of each prompt are paired by their scores (:func:`score_pairs`), and the pair's DPO-family loss
    (:func:`dpo_loss`, Rafailov et al. 2023 eq. 7 for ``sigmoid``) is averaged over the pairs.

    Pairs whose samples scored the same carry no preference. ``ties="skip"`` leaves them out of the loss (they count
    in no average: a batch of ties only has loss 0); ``ties="keep"`` trains on them as TRL 1.16's
    ``OnlineDPOTrainer`` does, the first sample as the chosen one.

    Args:
        policy_logps: ``[N]`` summed completion log-probs under the policy (``N = B * group_size``).
        ref_logps: ``[N]`` the same under the reference; ``None`` for reference-free losses.
        rewards: ``[N]`` the samples' scores (after any missing-EOS penalty).
        lengths: ``[N]`` completion token counts (length-normalised losses, ``rpo_alpha``).
        group_size: samples per prompt.
        ties: ``"skip"`` or ``"keep"`` (above).
        n_pairs: what the summed pair losses are divided by: by default the number of pairs counted here; under data
            parallelism the count over every rank divided by their number (so the ranks' mean is the global mean).
        beta, loss_type, label_smoothing, simpo_gamma, discopop_tau, rpo_alpha: as in :func:`dpo_loss`.

    Returns:
        ``(loss, values)``: the scalar fp32 loss (0, still connected to ``policy_logps``, when no pair counts), and
        ``[B]`` tensors ``chosen``, ``rejected`` (indices into the ``N`` samples), ``tie``, ``losses`` (per pair),
        ``chosen_rewards``, ``rejected_rewards`` (the detached implicit rewards ``beta (log pi - log pi_ref)``).
    """
    if ties not in ONLINE_DPO_TIES:
        raise ValueError(f"unknown ties {ties!r}; choose one of {ONLINE_DPO_TIES}")
    chosen, rejected, tie = score_pairs(rewards, group_size)
    pick = lambda values, idx: None if values is None else values[idx]  # noqa: E731
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_logps[chosen], policy_logps[rejected], pick(ref_logps, chosen), pick(ref_logps, rejected),
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, chosen_lengths=lengths[chosen],
        rejected_lengths=lengths[rejected], simpo_gamma=simpo_gamma, discopop_tau=discopop_tau, rpo_alpha=rpo_alpha,
    )  # fmt: skip
    counted = (~tie if ties == "skip" else torch.ones_like(tie)).to(losses.dtype)
    n = counted.sum() if n_pairs is None else torch.as_tensor(n_pairs, dtype=losses.dtype, device=losses.device)
    loss = (losses * counted).sum() / torch.where(n > 0, n, torch.ones_like(n))
    values = {"chosen": chosen, "rejected": rejected, "tie": tie, "losses": losses.detach(),
              "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}  # fmt: skip
    return loss, values


# ----- KTO ---------------------------------------------------------------------------------------------------------
def kto_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point ``z_0`` (Ethayarajh et al. 2024, eq. 7): ``KL(pi || pi_ref)`` estimated on mismatched
    pairs ``(x_i, y_j)``, ``j != i``, as the batch mean of ``log pi(y_j|x_i) - log pi_ref(y_j|x_i)``, clamped at 0
    and detached (no gradient flows through it), as TRL does.

    Args:
        policy_kl_logps, ref_kl_logps: ``[N]`` summed log-probs of the mismatched completions.

    Returns:
        a 0-dim fp32 tensor (0 for an empty batch).
    """
    diff = policy_kl_logps.detach().float() - ref_kl_logps.detach().float()
    if diff.numel() == 0:
        return diff.new_zeros(())
    return diff.mean().clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kahneman-Tversky optimisation (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
    Optimization", eqs. 7-8): with the implicit reward ``r(x, y) = log pi(y|x) - log pi_ref(y|x)`` and the reference
    point ``z_0`` (:func:`kto_reference_point`), each completion's value is

        ``v(x, y) = lambda_D sigmoid(beta (r - z_0))``  for a desirable ``y``,
        ``v(x, y) = lambda_U sigmoid(beta (z_0 - r))``  for an undesirable ``y``,

    and the loss is ``E[lambda_y - v(x, y)]``, i.e. ``lambda_y (1 - sigmoid(...))`` per completion, averaged over
    the batch's completions (desirable and undesirable together), as TRL's ``KTOTrainer`` reduces it.

    Args:
        policy_logps, ref_logps: ``[N]`` summed log-probs of each completion under the policy and the reference.
        labels: ``[N]`` booleans, true for a desirable completion.
        kl: the reference point ``z_0`` (a 0-dim tensor or a float; treated as a constant).
        beta: the KTO temperature (strength of the pull towards the reference).
        desirable_weight, undesirable_weight: ``lambda_D`` and ``lambda_U`` (the paper suggests
            ``lambda_D n_D / (lambda_U n_U)`` in ``[1, 4/3]``).

    Returns:
        ``(loss, chosen_rewards, rejected_rewards)``: the 0-dim fp32 mean loss (0 for an empty batch), and the
        detached implicit rewards ``beta r`` of the desirable ``[N_D]`` and undesirable ``[N_U]`` completions, in
        batch order.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(f"desirable_weight and undesirable_weight must be >= 0, got {desirable_weight}, "
                         f"{undesirable_weight}")  # fmt: skip
    if labels.dtype != torch.bool:
        raise TypeError(f"labels must be booleans (true: desirable), got dtype {labels.dtype}")
    logratios = policy_logps.float() - ref_logps.float()
    kl = torch.as_tensor(kl, dtype=logratios.dtype, device=logratios.device).detach()
    sign = torch.where(labels, 1.0, -1.0).to(logratios)
    weight = torch.where(labels, desirable_weight, undesirable_weight).to(logratios)
    losses = weight * (1 - torch.sigmoid(beta * sign * (logratios - kl)))
    loss = losses.sum() / max(losses.numel(), 1)
    rewards = beta * logratios.detach()
    return loss, rewards[labels], rewards[~labels]
