"""``lit-align recipe -c configs/recipe.yaml``: InstructGPT's recipe (SFT, reward model, PPO; DPO and GRPO beside it)
as one runnable unit, each stage an ordinary method config plus overrides, each stage's export feeding the next,
with held-out metrics before and after every stage, one evaluation of every policy on the same held-out prompts,
and a report directory (``report.md`` and PNG plots).

The recipe file is data (read with ``yaml.safe_load``; the method configs it names go through the CLI's import
allow-list like any other)::

    root: runs/recipe            # every stage writes under root/<stage>/
    model: tiny                  # what the first stage starts from (hub id, local directory, tiny)
    stages:
      sft:    {config: sft.yaml, overrides: {trainer: {max_epochs: 2}}}   # paths relative to this file
      reward: {config: reward.yaml, init: sft}                           # starts from sft's export
      ppo:    {config: ppo.yaml, init: sft, reward_model: reward}
    evaluation: {baseline: sft, reward_model: reward, prompts: {...}, verifiable: {...}, num_prompts: 32}

A stage runs ``lit-align fit -c <config> -c <root>/<stage>/recipe.yaml`` in this process; the second file holds the
recipe's overrides (output directories, the upstream exports) and is kept, so the stage can be re-run alone with
that command. A finished stage leaves ``<root>/<stage>/stage.json``; it is skipped on the next run unless its
config, its overrides or an upstream stage changed, or ``--rerun`` names it.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import os
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Recipe", "RecipeError", "Stage", "main"]

STAGE_KEYS = {"config", "init", "reward_model", "overrides"}
RECIPE_KEYS = {"root", "model", "stages", "evaluation"}
EVAL_KEYS = {"baseline", "reward_model", "prompts", "verifiable", "num_prompts", "max_new_tokens", "seed", "batch_size"}
#: the held-out metrics that say most about a stage: the first present of each group (at most one per group)
HEADLINE = (
    ("test/accuracy", "test/rewards/accuracies", "test/reward_mean", "test/loss"),
    ("test/kl", "test/rewards/margins", "test/loss", "test/ppl", "test/jsd"),
)


class RecipeError(ValueError):
    """A recipe file that cannot run as written (names the file and the key), or a stage that failed."""


def log(message: str) -> None:
    print(f"lit_align recipe: {message}", flush=True)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) else value
    return out


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float))
    os.replace(tmp, path)


@dataclass
class Stage:
    """One stage: a method config, the stage it starts from (``init``), the stage whose reward model it uses, and
    overrides merged over the config."""

    name: str
    config: Path
    init: str | None = None
    reward_model: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def directory(self, root: Path) -> Path:
        return root / self.name


class Recipe:
    """A parsed recipe file (see the module docstring). ``root`` overrides the file's output directory."""

    def __init__(self, path: str | Path, root: str | Path | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise RecipeError(f"recipe file {self.path} does not exist")
        try:
            spec = yaml.safe_load(self.path.read_text()) or {}
        except yaml.YAMLError as error:
            raise RecipeError(f"{self.path}: not valid YAML: {error}") from None
        self._check_keys(spec, RECIPE_KEYS, "")
        self.root = Path(root or spec.get("root") or "runs/recipe")
        self.model = spec.get("model")
        stages = spec.get("stages")
        if not isinstance(stages, Mapping) or not stages:
            raise RecipeError(f"{self.path}: 'stages' must map stage names to {{config: ..., ...}}")
        self.stages: dict[str, Stage] = {}
        for name, entry in stages.items():
            where = f"stages.{name}"
            if not str(name).isidentifier() or name in ("report", "evaluation"):
                raise RecipeError(f"{self.path}: stage name {name!r}: use a name like sft or ppo_long (it names "
                                  "the stage's directory; report and evaluation are the recipe's own)")  # fmt: skip
            if not isinstance(entry, Mapping) or "config" not in entry:
                raise RecipeError(f"{self.path}: {where} needs a 'config' (a method config such as sft.yaml)")
            self._check_keys(entry, STAGE_KEYS, where + ".")
            config = (self.path.parent / entry["config"]).resolve()
            if not config.is_file():
                raise RecipeError(f"{self.path}: {where}.config: {config} does not exist")
            for key in ("init", "reward_model"):
                if entry.get(key) is not None and entry[key] not in self.stages:
                    raise RecipeError(f"{self.path}: {where}.{key}: {entry[key]!r} is not an earlier stage "
                                      f"(earlier: {sorted(self.stages) or 'none'})")  # fmt: skip
            overrides = entry.get("overrides") or {}
            if not isinstance(overrides, Mapping):
                raise RecipeError(f"{self.path}: {where}.overrides must be a mapping of config keys")
            wired = {"trainer.default_root_dir", "model.init_args.export_dir", "model.init_args.model",
                     "model.init_args.reward_model"}  # fmt: skip
            for key in sorted(wired & set(_dotted(overrides))):
                raise RecipeError(f"{self.path}: {where}.overrides sets {key}, which the recipe sets (the stage's "
                                  "directory, or `init` / `reward_model` / `model`); set those instead")  # fmt: skip
            self.stages[name] = Stage(name, config, entry.get("init"), entry.get("reward_model"), dict(overrides))
        self.evaluation = dict(spec.get("evaluation") or {})
        self._check_keys(self.evaluation, EVAL_KEYS, "evaluation.")
        for key in ("baseline", "reward_model"):
            if self.evaluation.get(key) is not None and self.evaluation[key] not in self.stages:
                raise RecipeError(f"{self.path}: evaluation.{key}: {self.evaluation[key]!r} is not a stage")

    def _check_keys(self, spec: Mapping[str, Any], allowed: set[str], where: str) -> None:
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise RecipeError(f"{self.path}: unknown key {where}{unknown[0]} (allowed: {', '.join(sorted(allowed))})")

    # ----- one stage ----------------------------------------------------------------------------------------------
    def export(self, name: str) -> Path:
        return self.stages[name].directory(self.root) / "export"

    def stage_overrides(self, stage: Stage) -> dict[str, Any]:
        """What the recipe sets over the stage's config: its output directories and the upstream exports, then the
        stage's own ``overrides``."""
        out = stage.directory(self.root)
        init_args: dict[str, Any] = {"export_dir": str(out / "export")}
        if stage.init is not None:
            init_args["model"] = str(self.export(stage.init))
        elif self.model is not None:
            init_args["model"] = str(self.model)
        if stage.reward_model is not None:
            init_args["reward_model"] = str(self.export(stage.reward_model))
        recipe = {"trainer": {"default_root_dir": str(out)}, "model": {"init_args": init_args}}
        return _merge(recipe, stage.overrides)

    def record(self, name: str) -> dict[str, Any] | None:
        path = self.stages[name].directory(self.root) / "stage.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def export_digest(self, name: str) -> str | None:
        """The digest of a stage's export: of its checksum manifest (:mod:`lit_align.checksums`, the SHA-256 of every
        file), so that an export rewritten in any way (a re-run, the printed command run by hand) counts as new."""
        from lit_align.checksums import MANIFEST

        manifest = self.export(name) / MANIFEST
        return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16] if manifest.is_file() else None

    def fingerprint(self, stage: Stage) -> str:
        """Changes when the stage's config file, its overrides or the exports it reads change."""
        upstream = [self.export_digest(n) for n in (stage.init, stage.reward_model) if n is not None]
        payload = [stage.config.read_text(), self.stage_overrides(stage), upstream]
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def finished(self, name: str) -> bool:
        """Whether the stage finished with its current inputs and its export is still the one it wrote."""
        done = self.record(name) or {}
        current = done.get("fingerprint") == self.fingerprint(self.stages[name])
        return current and done.get("export_digest") == self.export_digest(name) is not None

    def command(self, stage: Stage) -> str:
        return f"lit-align fit -c {stage.config} -c {stage.directory(self.root) / 'recipe.yaml'}"

    def run_stage(self, stage: Stage) -> dict[str, Any]:
        """Fit the stage in this process with its held-out metrics (``trainer.test``) before and after training."""
        from lightning.pytorch.loggers import CSVLogger

        from lit_align.cli import run as cli_run

        out = stage.directory(self.root)
        out.mkdir(parents=True, exist_ok=True)
        overrides = self.stage_overrides(stage)
        config = yaml.safe_load(stage.config.read_text()) or {}
        logger = (overrides.get("trainer") or {}).get("logger", (config.get("trainer") or {}).get("logger"))
        if logger is not False:  # the report draws its plots from Lightning's CSV metrics, beside any other logger
            csv = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out)}}
            others = [] if logger in (None, True) else logger if isinstance(logger, list) else [logger]
            overrides = _merge(overrides, {"trainer": {"logger": [*others, csv] if others else csv}})
        (out / "recipe.yaml").write_text(
            f"# written by lit-align recipe ({self.path}): the recipe's settings over {stage.config.name}\n"
            + yaml.safe_dump(overrides, sort_keys=False)
        )
        start = time.perf_counter()
        try:
            cli = cli_run(["-c", str(stage.config), "-c", str(out / "recipe.yaml")], run=False)
        except SystemExit as error:  # the parser has printed why
            raise RecipeError(f"its config did not parse (exit {error.code}; the parser's message is above)") from None
        trainer, module, data = cli.trainer, cli.model, cli.datamodule
        before = trainer.test(module, datamodule=data, verbose=False)[0]
        trainer.fit(module, datamodule=data)
        after = trainer.test(module, datamodule=data, verbose=False)[0]
        logs = next((lg.log_dir for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        seconds, method = time.perf_counter() - start, type(module).__name__
        del cli, trainer, module, data
        gc.collect()
        return {"before": before, "after": after, "seconds": seconds, "logs": logs, "method": method}

    # ----- the whole recipe ---------------------------------------------------------------------------------------
    def run(self, only: Sequence[str] | None = None, rerun: Sequence[str] = (), evaluate: bool = True) -> dict:
        """Run the stages in order (``only``: a subset, whose upstream stages must have finished), skipping finished
        ones unless changed or named in ``rerun`` (``"all"``: every stage); then evaluate and write the report."""
        for name in [*(only or []), *(n for n in rerun if n != "all")]:
            if name not in self.stages:
                raise RecipeError(f"{self.path}: no stage named {name!r} (stages: {', '.join(self.stages)})")
        selected = [n for n in self.stages if only is None or n in only]
        self.root.mkdir(parents=True, exist_ok=True)
        total = time.perf_counter()
        for index, name in enumerate(selected, 1):
            stage = self.stages[name]
            tag = f"[{index}/{len(selected)}] {name}"
            for upstream in (stage.init, stage.reward_model):
                if upstream is not None and not self.finished(upstream):
                    raise RecipeError(f"stage {name!r} reads stage {upstream!r}, which has not finished (or its "
                                      f"export {self.export(upstream)} changed since); run it first")  # fmt: skip
            fingerprint = self.fingerprint(stage)
            if self.finished(name) and name not in rerun and "all" not in rerun:
                log(f"{tag}: finished earlier, skipped (export {self.export(name)}; --rerun {name} to redo it)")
                continue
            log(f"{tag}: starting: {self.command(stage)}")
            # a run that stops half-way (killed, failed) must not leave the previous record vouching for its export
            (stage.directory(self.root) / "stage.json").unlink(missing_ok=True)
            try:
                result = self.run_stage(stage)
            except BaseException as error:
                out = stage.directory(self.root)
                out.mkdir(parents=True, exist_ok=True)
                (out / "error.log").write_text(traceback.format_exc())
                log(f"{tag} FAILED: {type(error).__name__}: {error}")
                log(f"  traceback: {out / 'error.log'}; logs: {out}; re-run it alone: {self.command(stage)}")
                raise RecipeError(
                    f"stage {name!r} failed ({type(error).__name__}: {error}); see {out / 'error.log'}"
                ) from error
            result.update(fingerprint=fingerprint, export_digest=self.export_digest(name),
                          export=str(self.export(name)), config=str(stage.config),
                          command=self.command(stage))  # fmt: skip
            _write_json(stage.directory(self.root) / "stage.json", result)
            shown = "; ".join(f"{k} {_fmt(result['before'].get(k))} -> {_fmt(result['after'].get(k))}"
                              for k in headline(result["after"]))  # fmt: skip
            log(f"{tag}: finished in {result['seconds']:.0f} s: {shown}; export {self.export(name)}; "
                f"logs {result['logs']}")  # fmt: skip
        try:
            evaluation = self.evaluate() if evaluate else self.last_evaluation()
        except (ValueError, TypeError, OSError) as error:
            raise RecipeError(f"the evaluation failed: {type(error).__name__}: {error}") from error
        from lit_align.report import write_report

        report = write_report(self, evaluation)
        print_summary(self, evaluation)
        log(f"report: {report} ({time.perf_counter() - total:.0f} s in all)")
        return {"report": report, "evaluation": evaluation}

    # ----- evaluation ---------------------------------------------------------------------------------------------
    def policies(self) -> list[str]:
        """The finished stages whose export is a policy (every method's but the reward model's), in order."""
        return [n for n in self.stages if self.finished(n) and (self.record(n) or {}).get("method") != "RewardModule"]

    def last_evaluation(self) -> dict[str, Any] | None:
        """The last evaluation written (``evaluation.json``), for a report made without evaluating."""
        try:
            return json.loads((self.root / "evaluation.json").read_text())
        except (OSError, ValueError):
            return None

    def evaluate(self) -> dict[str, Any] | None:
        """Every finished policy (and the model the first stage started from), evaluated on the same held-out
        prompts (:mod:`lit_align.evaluate`); cached in ``<root>/evaluation.json`` under the stages' run ids."""
        import torch

        from lit_align.data import PromptDataModule
        from lit_align.evaluate import EvalPrompts, evaluate_policy, win_rate
        from lit_align.models import load_causal_lm, load_tokenizer
        from lit_align.modules import RewardScorer

        spec = self.evaluation
        policies = self.policies()
        if not spec or not policies:
            return None
        baseline = spec.get("baseline") if spec.get("baseline") in policies else policies[0]
        if spec.get("baseline") not in (None, baseline):
            log(f"evaluation: the baseline {spec.get('baseline')!r} has not finished; comparing with {baseline!r}")
        rm_stage = spec.get("reward_model")
        key = {"spec": spec, "exports": {n: self.export_digest(n) for n in self.stages}, "model": self.model}
        cache = self.root / "evaluation.json"
        try:
            cached = json.loads(cache.read_text())
            if cached.get("key") == json.loads(json.dumps(key, default=str)):
                log(f"evaluation: unchanged since the last run, read from {cache}")
                return cached
        except (OSError, ValueError):
            pass
        start = time.perf_counter()
        tokenizer = load_tokenizer(str(self.export(baseline)))
        limit = int(spec.get("num_prompts", 32))
        prompt_data = PromptDataModule(tokenizer, **(spec.get("prompts") or {}))
        prompts = EvalPrompts.from_datamodule(prompt_data, limit)
        verifiable = None
        if spec.get("verifiable"):
            verifiable = EvalPrompts.from_datamodule(PromptDataModule(tokenizer, **spec["verifiable"]), limit)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        scorer = None
        if rm_stage is not None and self.finished(rm_stage):
            scorer = RewardScorer.from_pretrained(self.export(rm_stage)).to(device)
        options = dict(max_new_tokens=int(spec.get("max_new_tokens", 48)), seed=int(spec.get("seed", 0)),
                       batch_size=int(spec.get("batch_size", 16)))  # fmt: skip
        base_model = load_causal_lm(str(self.export(baseline))).to(device)
        log(f"evaluation: {len(policies) + 1} policies on {len(prompts.texts)} held-out prompts"
            + (f" and {len(verifiable.texts)} questions with answers" if verifiable else ""))  # fmt: skip
        torch.manual_seed(0)
        results: dict[str, Any] = {}
        # the baseline once: its samples are what the others' win rates compare with; against itself, a tie each
        base_numbers, baseline_samples = evaluate_policy(base_model, tokenizer, prompts, baseline=base_model,
                                                         reward_model=scorer, verifiable=verifiable,
                                                         **options)  # fmt: skip
        if base_numbers.rewards:
            base_numbers.win_rate, base_numbers.win_rate_se = win_rate(*[torch.tensor(base_numbers.rewards)] * 2)
        candidates = [("start", self.model or _start_model(self))] + [(n, str(self.export(n))) for n in policies]
        for name, where in candidates:
            if where is None:
                continue
            if name == baseline:
                numbers = base_numbers
            else:
                policy = load_causal_lm(where).to(device)
                numbers, _ = evaluate_policy(policy, tokenizer, prompts, baseline=base_model,
                                             baseline_samples=baseline_samples, reward_model=scorer,
                                             verifiable=verifiable, **options)  # fmt: skip
                del policy
                gc.collect()
            results[name] = {
                "model": where,
                **numbers.metrics(),
                "samples": numbers.samples,
                "rewards": numbers.rewards,
            }
        payload = {"key": key, "baseline": baseline, "reward_model": rm_stage, "prompts": prompts.texts,
                   "questions": verifiable.texts if verifiable else [],
                   "policies": results, "seconds": time.perf_counter() - start}  # fmt: skip
        _write_json(cache, json.loads(json.dumps(payload, default=str)))
        log(f"evaluation: done in {payload['seconds']:.0f} s")
        return payload


def _dotted(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every key path of a nested mapping, dotted (``model.init_args.lr``)."""
    keys = []
    for key, value in tree.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, Mapping):
            keys += _dotted(value, f"{prefix}{key}.")
    return keys


def _start_model(recipe: Recipe) -> str | None:
    """The model the recipe's first stage started from (its config's ``model.init_args.model``)."""
    first = next(iter(recipe.stages.values()))
    if first.init is not None:
        return None
    config = yaml.safe_load(first.config.read_text()) or {}
    return ((config.get("model") or {}).get("init_args") or {}).get("model")


def headline(metrics: Mapping[str, Any]) -> list[str]:
    """The (at most two) held-out metrics that say most about a stage (:data:`HEADLINE`)."""
    keys: list[str] = []
    for group in HEADLINE:
        found = next((k for k in group if k in metrics and k not in keys), None)
        keys += [found] if found else []
    return keys


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def print_summary(recipe: Recipe, evaluation: Mapping[str, Any] | None) -> None:
    """The final table: each stage's held-out metrics before -> after, its time and export; then the evaluation."""
    rows = [("stage", "held-out metric", "before", "after", "time", "export")]
    for name in recipe.stages:
        done = recipe.record(name)
        if not done:
            rows.append((name, "(not run)", "", "", "", ""))
            continue
        for i, key in enumerate(headline(done["after"])):
            rows.append((name if i == 0 else "", key, _fmt(done["before"].get(key)), _fmt(done["after"].get(key)),
                         f"{done['seconds']:.0f} s" if i == 0 else "", done["export"] if i == 0 else ""))  # fmt: skip
    print(_table(rows))
    if evaluation:
        columns = ("reward", "kl", "win_rate", "accuracy", "response_length")
        rows = [("policy", *columns)]
        for name, numbers in evaluation["policies"].items():
            cells = [_fmt(numbers.get(c)) for c in columns]
            if numbers.get("win_rate_se") is not None:
                cells[2] += f" +- {numbers['win_rate_se']:.2f}"
            rows.append((name, *cells))
        print(f"held-out evaluation ({len(evaluation['prompts'])} prompts; reward model: {evaluation['reward_model']}; "
              f"KL and win rate against {evaluation['baseline']}):")  # fmt: skip
        print(_table(rows))


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``lit-align recipe`` command."""
    parser = argparse.ArgumentParser(
        prog="lit-align recipe",
        description="Run a multi-stage recipe (SFT -> reward -> PPO / DPO / GRPO), evaluate every policy on the same "
        "held-out prompts and write a report (report.md and plots) under the recipe's root.",
    )
    parser.add_argument("-c", "--config", required=True, help="the recipe file (configs/recipe.yaml)")
    parser.add_argument("--stages", help="comma-separated stages to run (default: all); their upstream must be done")
    parser.add_argument("--rerun", default="", help="comma-separated stages to redo even if finished, or 'all'")
    parser.add_argument("--root", help="output directory (default: the file's root)")
    parser.add_argument("--no_eval", action="store_true", help="skip the held-out evaluation of the policies")
    args = parser.parse_args(argv)
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    try:
        recipe = Recipe(args.config, root=args.root)
        recipe.run(split(args.stages) if args.stages else None, split(args.rerun), evaluate=not args.no_eval)
    except RecipeError as error:
        print(f"lit-align recipe: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
