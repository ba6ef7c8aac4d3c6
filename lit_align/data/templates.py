"""FLAN-style instruction templates (Wei et al. 2022, "Finetuned Language Models Are Zero-Shot Learners").

A task has several natural-language templates that phrase the same record differently; a classification task lists
its answer options after an OPTIONS marker so that the model learns which outputs exist. Templates are data: a YAML or
JSON file, or a dict, of this shape::

    sentiment:                       # task name; rows pick a task by their "task" field when there are several
      templates:
        - prompt: "{text}\\nDid the reviewer like the movie?"
          completion: "{label}"
        - prompt: "Review: {text}\\nIs this review positive or negative?{options}"
          completion: "{label}"
      options: [negative, positive]   # or options_field: choices (a row field holding the list)

``{field}`` placeholders are filled from the row. Options are rendered as ``"\\n\\nOPTIONS:\\n- a\\n- b"`` (FLAN's
layout, marker configurable) at ``{options}`` if the template has that placeholder, else after the prompt.
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lit_align.data.sources import DataError

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt format (Taori et al. 2023) for an instruction and an optional input."""
    return ALPACA_PROMPT.format(
        with_input=", paired with an input that provides further context" if input else "",
        instruction=instruction,
        input_block=f"### Input:\n{input}\n\n" if input else "",
    )


@dataclass
class Template:
    """One phrasing of a task: ``str.format`` strings over the row's fields."""

    prompt: str
    completion: str

    def fields(self) -> set[str]:
        names = set()
        for text in (self.prompt, self.completion):
            names |= {name for _, name, _, _ in string.Formatter().parse(text) if name}
        return names - {"options"}


@dataclass
class TaskTemplates:
    """The templates of one task, and its answer options (fixed, or read from a row field)."""

    templates: list[Template]
    options: list[str] | None = None
    options_field: str | None = None

    def __post_init__(self) -> None:
        if not self.templates:
            raise ValueError("a task needs at least one template")
        if self.options is not None and self.options_field is not None:
            raise ValueError("give either 'options' or 'options_field', not both")


@dataclass
class TemplateSet:
    """All tasks' templates, and how to render a row through them.

    Args:
        tasks: task name to its templates.
        options_marker: the text that introduces the answer options (FLAN: ``"OPTIONS:"``).
        seed: rows pick their template with a generator seeded by this and the row's position, so a dataset renders
            the same way every run.
    """

    tasks: dict[str, TaskTemplates]
    options_marker: str = "OPTIONS:"
    seed: int = 0

    def render(
        self, row: Mapping[str, Any], index: int, where: str, every_template: bool = False
    ) -> list[tuple[str, str]]:
        """``(prompt, completion)`` pairs for ``row``: one template picked per row, or all of them."""
        task = self._task(row, where)
        templates = task.templates if every_template else [random.Random(f"{self.seed}:{index}").choice(task.templates)]
        options = self._options(task, row, where)
        return [self._fill(t, row, options, where) for t in templates]

    def _task(self, row: Mapping[str, Any], where: str) -> TaskTemplates:
        if len(self.tasks) == 1:
            return next(iter(self.tasks.values()))
        name = row.get("task")
        if name not in self.tasks:
            raise DataError(where, "task", f"names no known task ({name!r}); expected one of {sorted(self.tasks)}")
        return self.tasks[name]

    def _options(self, task: TaskTemplates, row: Mapping[str, Any], where: str) -> str:
        options = task.options
        if task.options_field is not None:
            options = row.get(task.options_field)
            if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
                raise DataError(where, task.options_field, "must be a non-empty list of strings (the answer options)")
        if not options:
            return ""
        return f"\n\n{self.options_marker}\n" + "\n".join(f"- {option}" for option in options)

    @staticmethod
    def _fill(template: Template, row: Mapping[str, Any], options: str, where: str) -> tuple[str, str]:
        values = {}
        for name in template.fields():
            value = row.get(name)
            if value is None:
                raise DataError(where, name, "is missing but the template uses it")
            values[name] = value if isinstance(value, str) else str(value)
        prompt = template.prompt
        if options and "{options}" not in prompt:
            prompt = prompt + "{options}"
        return prompt.format(options=options, **values), template.completion.format(options=options, **values)


def load_templates(
    spec: str | Path | Mapping[str, Any], options_marker: str = "OPTIONS:", seed: int = 0
) -> TemplateSet:
    """A :class:`TemplateSet` from a YAML/JSON file path or a dict of the shape in the module docstring."""
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        with open(path, encoding="utf-8") as f:
            spec = yaml.safe_load(f)  # YAML is a superset of JSON
        if not isinstance(spec, Mapping):
            raise ValueError(f"{path}: templates must be a mapping of task name to its templates")
    tasks = {}
    for name, task in spec.items():
        if not isinstance(task, Mapping) or "templates" not in task:
            raise ValueError(f"templates for task {name!r} must be a mapping with a 'templates' list")
        templates = [
            Template(prompt=t["prompt"], completion=t.get("completion", "{output}")) for t in task["templates"]
        ]
        tasks[name] = TaskTemplates(templates, task.get("options"), task.get("options_field"))
    return TemplateSet(tasks, options_marker=options_marker, seed=seed)
