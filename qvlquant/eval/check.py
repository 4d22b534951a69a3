"""The CI gate: a quantized model's eval report against its full-precision baseline, under per-task tolerances.

Bad input raises ValueError naming the file or the setting: a report without the fields the gate reads, a tolerance
for a task qvlquant does not evaluate (a typo such as ``easyvqq``), a negative, infinite or non-numeric tolerance.
A regression is not an error but a result (``CheckResult.passed`` is False), so that a command line can keep the
two apart (``qvlquant check``: exit 2 for bad input, 1 for a regression).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Iterable, Mapping

from qvlquant.eval.metrics import EVAL_TASKS
from qvlquant.storage.files import read_text_bounded

DEFAULT_MAX_DROP = 1.0  # accuracy points a task may lose
DEFAULT_MAX_PPL_INCREASE = 2.0  # percent held-out perplexity may rise
MAX_REPORT_BYTES = 1 << 20  # a report is a summary of a few KB (the per-question outputs are written beside it)


def tolerance(value, what: str) -> float:
    """``value`` as a finite, non-negative float; ``what`` names it in the error (a flag or a recipe key)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r:.80}")
    return float(value)


def known_task(task, what: str) -> str:
    """``task`` when qvlquant evaluates it (metrics.EVAL_TASKS); ``what`` names where it was given."""
    if task not in EVAL_TASKS:
        raise ValueError(f"{what}: unknown task {task!r:.80}; known: {', '.join(EVAL_TASKS)}")
    return task


@dataclasses.dataclass(frozen=True)
class Tolerances:
    """Accuracy points each task may lose (DEFAULT_MAX_DROP for a task not named) and the percent held-out
    perplexity may rise. Validated on construction."""

    max_drop: Mapping[str, float] = dataclasses.field(default_factory=dict)
    max_ppl_increase: float = DEFAULT_MAX_PPL_INCREASE

    def __post_init__(self):
        if not isinstance(self.max_drop, Mapping):
            raise ValueError(f"max_drop must map task -> points, got {self.max_drop!r}")
        drops = {known_task(t, "max_drop"): tolerance(v, f"max_drop[{t!r}]") for t, v in self.max_drop.items()}
        object.__setattr__(self, "max_drop", drops)  # a private copy: the caller's dict can change afterwards
        object.__setattr__(self, "max_ppl_increase", tolerance(self.max_ppl_increase, "max_ppl_increase"))

    def drop(self, task: str) -> float:
        return self.max_drop.get(task, DEFAULT_MAX_DROP)

    def override(self, max_drop: Mapping[str, float] | None = None,
                 max_ppl_increase: float | None = None) -> Tolerances:
        """These tolerances with the given ones winning (flags over a recipe's check: section)."""
        ppl = self.max_ppl_increase if max_ppl_increase is None else max_ppl_increase
        return Tolerances({**self.max_drop, **(max_drop or {})}, ppl)


def parse_max_drop(items: Iterable[str]) -> dict[str, float]:
    """``["easyvqa=0.5", ...]`` (the --max-drop flags) -> {task: points}; a later item for the same task wins."""
    drops = {}
    for item in items:
        task, sep, points = item.partition("=")
        try:
            value = float(points)
        except ValueError:
            value = None
        if not sep or not task or value is None:
            raise ValueError(f"--max-drop {item!r}: expected TASK=POINTS, e.g. easyvqa=0.5")
        drops[known_task(task, f"--max-drop {item!r}")] = tolerance(value, f"--max-drop {item!r}: POINTS")
    return drops


def read_report(path: str | pathlib.Path) -> dict:
    """An eval report (qvlquant eval --report) from its JSON file: a regular file of at most MAX_REPORT_BYTES."""
    text = read_text_bounded(path, MAX_REPORT_BYTES, "eval report")
    try:
        report = json.loads(text)
    except (ValueError, RecursionError) as e:
        reason = e if isinstance(e, ValueError) else "nested too deeply"
        raise ValueError(f"cannot read eval report {path}: {reason}") from None
    if not isinstance(report, dict):
        raise ValueError(f"{path}: not an eval report (a JSON object from qvlquant eval --report)")
    return report


def _number(entry: dict, key: str, where: str) -> float:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: {key} must be a finite number, got {value!r:.80}; is it a qvlquant eval report?")
    return float(value)


def task_scores(report: dict, where: str = "the report") -> dict[str, float]:
    """task -> accuracy (percent) of an eval report (one task at the top level, more under "tasks")."""
    tasks = report.get("tasks", {})
    if not isinstance(tasks, dict) or not all(isinstance(t, dict) for t in tasks.values()):
        raise ValueError(f"{where}: tasks must map task -> {{accuracy, n, ...}}")
    scores = {name: _number(t, "accuracy", f"{where}: tasks.{name}") for name, t in tasks.items()}
    if "task" in report:
        if not isinstance(report["task"], str):
            raise ValueError(f"{where}: task must be a task name, got {report['task']!r:.80}")
        scores[report["task"]] = _number(report, "accuracy", where)
    if not scores:
        raise ValueError(f"{where}: not an eval report (no task and accuracy); write one with qvlquant eval --report")
    return scores


def validate_report(report, where: str) -> dict:
    """``report`` when it holds what the gate and the model card read, of their types (accuracy per task; n, model
    and perplexity where present; the embedded baseline, when there is one, likewise), else a ValueError naming
    the field."""
    if not isinstance(report, dict):
        raise ValueError(f"{where}: not an eval report (a JSON object from qvlquant eval --report)")
    task_scores(report, where)
    if "perplexity" in report:
        _number(report, "perplexity", where)
    n = report.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ValueError(f"{where}: n must be a whole number >= 0, got {n!r:.80}")
    if not isinstance(report.get("model", ""), str):
        raise ValueError(f"{where}: model must be a string, got {report['model']!r:.80}")
    if report.get("baseline") is not None:
        validate_report(report["baseline"], f"{where}: baseline")
    return report


@dataclasses.dataclass(frozen=True)
class Row:
    measure: str
    baseline: float
    candidate: float
    limit: str
    ok: bool


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """The gate's rows; it passed when every row is ok."""

    rows: tuple[Row, ...]

    @property
    def failed(self) -> list[str]:
        return [r.measure for r in self.rows if not r.ok]

    @property
    def passed(self) -> bool:
        return not self.failed


def verdicts(candidate: dict, baseline: dict, tolerances: Tolerances | None = None) -> list[Row]:
    """One row per baseline task (accuracy may drop by its tolerance) and one for held-out perplexity when both
    reports have it (may rise by max_ppl_increase percent)."""
    tolerances = tolerances or Tolerances()
    cand, base = task_scores(candidate, "the candidate report"), task_scores(baseline, "the baseline report")
    missing = sorted(set(base) - set(cand))
    if missing:
        raise ValueError(f"the candidate report lacks task(s) {missing} that the baseline has; evaluate them too")
    if candidate.get("n") != baseline.get("n"):
        raise ValueError(f"the reports scored different numbers of questions ({candidate.get('n')} vs "
                         f"{baseline.get('n')}); use the same --limit")
    rows = []
    for task in sorted(base):
        drop = tolerances.drop(task)
        rows.append(Row(f"{task} accuracy %", base[task], cand[task], f">= {base[task] - drop:.2f}",
                        cand[task] >= base[task] - drop))
    if "perplexity" in candidate and "perplexity" in baseline:
        bound = baseline["perplexity"] * (1 + tolerances.max_ppl_increase / 100)
        rows.append(Row("held-out perplexity", baseline["perplexity"], candidate["perplexity"], f"<= {bound:.3f}",
                        candidate["perplexity"] <= bound))
    return rows


def check(report: dict | str | pathlib.Path, baseline: dict | str | pathlib.Path | None = None,
          tolerances: Tolerances | None = None) -> CheckResult:
    """Gate ``report`` (an eval report, or the path of its JSON) against ``baseline`` (a report or a path; default:
    the baseline embedded in the report). Raises ValueError on bad input; a regression is ``passed == False``."""
    where = "the report" if isinstance(report, dict) else str(report)
    report = validate_report(report if isinstance(report, dict) else read_report(report), where)
    if baseline is None:
        if report.get("baseline") is None:
            raise ValueError(f"{where} holds no baseline; pass --baseline BASE.json")
        baseline, base_where = report["baseline"], f"{where}: baseline"
    else:
        base_where = "the baseline" if isinstance(baseline, dict) else str(baseline)
        baseline = baseline if isinstance(baseline, dict) else read_report(baseline)
    validate_report(baseline, base_where)
    return CheckResult(tuple(verdicts(report, baseline, tolerances)))


def format_rows(rows: Iterable[Row]) -> str:
    lines = [f"{'measure':<24} {'baseline':>10} {'candidate':>10} {'allowed':>12}  verdict"]
    for r in rows:
        lines.append(f"{r.measure:<24} {r.baseline:>10.3f} {r.candidate:>10.3f} {r.limit:>12}  {'ok' if r.ok else 'REGRESSION'}")
    return "\n".join(lines)
