"""The recipe's report: ``<root>/report/report.md`` with PNG plots drawn with matplotlib from the metrics Lightning
logged (each stage's ``CSVLogger`` ``metrics.csv``), the held-out metrics of every stage before and after, the
evaluation of every policy on the same held-out prompts, and sample generations side by side."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["read_metrics", "write_report"]

#: the panels of a stage's figure: a title and the logged keys it draws, those the stage logged (a training metric
#: logged per step and per epoch is drawn per step: ``<key>_step``); ``test/...`` are the held-out metrics before
#: and after the stage, drawn as squares
PANELS = (
    ("loss", ("train/loss", "val/loss", "test/loss", "train/policy_loss", "train/value_loss")),
    ("reward", ("train/reward_mean", "val/reward_mean", "test/reward_mean")),
    ("KL to the reference (nats / sequence)", ("train/kl", "val/kl", "test/kl")),
    ("KL coefficient", ("train/kl_coef",)),
    (
        "accuracy",
        (
            "train/accuracy",
            "val/accuracy",
            "test/accuracy",
            "train/rewards/accuracies",
            "val/rewards/accuracies",
            "test/rewards/accuracies",
            "train/token_acc",
            "val/token_acc",
        ),
    ),
    ("implicit reward margin", ("train/rewards/margins", "val/rewards/margins", "test/rewards/margins")),
)


def read_metrics(log_dir: str | Path | None) -> list[dict[str, float]]:
    """The rows of a ``CSVLogger`` ``metrics.csv`` as ``{key: value}`` (empty cells left out); ``[]`` if absent."""
    if log_dir is None or not (Path(log_dir) / "metrics.csv").is_file():
        return []
    rows = []
    with open(Path(log_dir) / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            values = {}
            for key, value in row.items():
                try:
                    values[key] = float(value)
                except (TypeError, ValueError):
                    continue
            rows.append(values)
    return rows


def series(rows: Sequence[Mapping[str, float]], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of one logged key (finite values only)."""
    points = [(r.get("step", i), r[key]) for i, r in enumerate(rows) if key in r and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def plot_stage(name: str, rows: Sequence[Mapping[str, float]], path: Path) -> Path | None:
    """One figure of the stage's training curves (the :data:`PANELS` it logged), or ``None`` if it logged none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for title, keys in PANELS:
        present = [f"{k}_step" if series(rows, f"{k}_step")[0] else k for k in keys]
        present = [k for k in present if series(rows, k)[0]]
        if present:
            panels.append((title, present))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            steps, values = series(rows, key)
            style = "s" if key.startswith("test/") else "o-" if key.startswith("val/") or len(steps) < 4 else "-"
            ax.plot(steps, values, style, markersize=3, label=key.replace("_step", ""))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(name)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_evaluation(evaluation: Mapping[str, Any], path: Path) -> Path | None:
    """Bar charts of the evaluation: mean reward, win rate against the baseline, KL to it, and accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = evaluation["policies"]
    columns = [c for c in ("reward", "win_rate", "kl", "accuracy") if any(c in p for p in policies.values())]
    if not columns:
        return None
    fig, axes = plt.subplots(1, len(columns), figsize=(3.6 * len(columns), 3.2), squeeze=False)
    names = list(policies)
    for ax, column in zip(axes[0], columns):
        values = [policies[n].get(column, float("nan")) for n in names]
        errors = [policies[n].get("win_rate_se", 0.0) for n in names] if column == "win_rate" else None
        bars = ax.bar(names, values, yerr=errors, capsize=3, color="tab:blue")
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        if column == "kl" and max(values) > 10 * max(sorted(values)[len(values) // 2], 1e-3):
            ax.set_yscale("symlog", linthresh=1.0)  # one far policy (the untrained start) must not flatten the rest
        ax.set_title({"reward": "mean reward (reward model)", "win_rate": f"win rate vs {evaluation['baseline']}",
                      "kl": f"KL to {evaluation['baseline']} (nats)",
                      "accuracy": f"answer accuracy ({len(evaluation.get('questions') or [])} questions)"}[column],
                     fontsize=10)  # fmt: skip
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
        if column == "win_rate":
            ax.axhline(0.5, color="grey", linewidth=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", "<br>")


def _md_table(rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(c) for c in rows[0]) + " |", "|" + " --- |" * len(rows[0])]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows[1:]]
    return lines


def write_report(recipe: Any, evaluation: Mapping[str, Any] | None, num_samples: int = 4) -> Path:
    """Write ``<root>/report/report.md`` and its plots; returns the path of ``report.md``."""
    out = recipe.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# lit_align recipe report: {recipe.path.resolve()}", ""]
    rows = [("stage", "held-out metric", "before", "after", "time (s)", "export")]
    details: list[str] = []
    for name in recipe.stages:
        done = recipe.record(name)
        if not done:
            rows.append((name, "not run", None, None, None, None))
            continue
        for i, key in enumerate(sorted(done["after"])):
            first = i == 0
            rows.append((name if first else "", key, done["before"].get(key), done["after"].get(key),
                         done["seconds"] if first else None, done["export"] if first else ""))  # fmt: skip
        figure = plot_stage(name, read_metrics(done.get("logs")), out / f"{name}.png")
        details += [f"### {name}", "", f"`{done['command']}`", ""]
        details += [f"![{name}]({figure.name})", ""] if figure else ["(no CSV metrics were logged)", ""]
    lines += ["## Stages: held-out metrics before and after training", "", *_md_table(rows), ""]
    lines += ["Before: the stage's starting model; after: the trained model; both on the stage's held-out split, "
              "computed as `lit-align test` computes them, with the stage's own settings (PPO and GRPO sample with "
              "their own `max_new_tokens` and temperature, so their rewards are not the evaluation's below). An "
              "accuracy of implicit rewards (DPO) counts a tie as a miss: all are ties at the start.", ""]  # fmt: skip
    if evaluation:
        policies = evaluation["policies"]
        columns = ("reward", "kl", "win_rate", "win_rate_se", "accuracy", "response_length")
        lines += ["## Every policy on the same held-out prompts", ""]
        lines += [f"{len(evaluation['prompts'])} held-out prompts, one sample each at temperature 1. `reward`: mean "
                  f"score under the `{evaluation['reward_model']}` reward model; `kl`: KL to the "
                  f"`{evaluation['baseline']}` policy in nats per sequence; `win_rate`: share of prompts where the "
                  f"reward model prefers the policy's sample to `{evaluation['baseline']}`'s (ties half; "
                  "`win_rate_se` its standard error over prompts); the samples are paired: prompt i's sample is drawn "
                  "from the same seed for every policy, so policies that differ little often give the same text (a "
                  f"tie). `accuracy`: greedy answers to {len(evaluation.get('questions') or [])} held-out questions "
                  "whose final number matches the reference; `response_length` in tokens. `start` is the model "
                  "the first stage started from.", ""]  # fmt: skip
        lines += _md_table([("policy", *columns)] + [(n, *(p.get(c) for c in columns)) for n, p in policies.items()])
        figure = plot_evaluation(evaluation, out / "evaluation.png")
        lines += ["", f"![evaluation]({figure.name})" if figure else "", ""]
        lines += ["## Sample generations", ""]
        for i, prompt in enumerate(evaluation["prompts"][:num_samples]):
            shown = prompt if len(prompt) <= 400 else "..." + prompt[-400:]  # the end: what the policy continues
            lines += [f"**Prompt {i + 1}:** {_cell(shown)}", ""]
            table = [("policy", "completion", "reward")]
            table += [(n, p["samples"][i][:300], p["rewards"][i] if p.get("rewards") else None)
                      for n, p in policies.items()]  # fmt: skip
            lines += [*_md_table(table), ""]
    lines += ["## Training curves", "", *details]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
