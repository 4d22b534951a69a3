"""The CI gate: a quantized model's eval report against its full-precision baseline, under per-task tolerances.

Bad input raises ValueError naming the file or the setting: a report without the fields the gate reads, a tolerance
for a task qvlquant does not evaluate (a typo such as ``easyvqq``), a negative, infinite or non-numeric tolerance,
a tolerance named explicitly (``--max-drop``) for a task the reports do not hold (a recipe's ``check:`` section may
name tasks a report lacks: those are ignored). A regression is not an error but a result (``CheckResult.passed`` is
False), so that a command line can keep the two apart (``qvlquant check``: exit 2 for bad input, 1 for a
regression).

Each accuracy row carries the standard error of the difference, sqrt(p(1-p)/n) per side combined (for a score in
[0, 1] such as ANLS, p(1-p) bounds its variance); a tolerance below NOISE_STD_ERRORS of them is warned about,
since such a drop cannot be told from the noise of n questions.
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
NOISE_STD_ERRORS = 2.0  # a tolerance below this many standard errors of the difference gates on noise


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


def task_counts(report: dict) -> dict[str, int | None]:
    """task -> number of questions scored (a task's own ``n``, else the report's; None when neither is a count)."""
    def count(value):
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    counts = {name: count(t.get("n", report.get("n"))) for name, t in report.get("tasks", {}).items()}
    if "task" in report:
        counts[report["task"]] = count(report.get("n"))
    return counts


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
    allowed_drop: float | None = None  # accuracy rows: the tolerance, in points
    n: int | None = None  # accuracy rows: questions scored on each side
    std_error: float | None = None  # accuracy rows: standard error of candidate - baseline, in points


def std_error_of_difference(baseline: float, candidate: float, n: int) -> float:
    """Points: sqrt(p(1-p)/n) for each side (accuracies in percent), combined as independent."""
    var = sum(p / 100 * (1 - p / 100) for p in (baseline, candidate)) / n
    return 100 * math.sqrt(max(var, 0.0))


def noise_warning(row: Row) -> str | None:
    """A warning when ``row``'s tolerance is below NOISE_STD_ERRORS standard errors of the difference, with the
    number of questions that would bring it there."""
    if row.std_error is None or row.allowed_drop is None or row.allowed_drop >= NOISE_STD_ERRORS * row.std_error:
        return None
    task = row.measure.removesuffix(" accuracy %")
    noise = (f"{task}: a {row.allowed_drop:g}-point tolerance is below {NOISE_STD_ERRORS:g} standard errors of the "
             f"difference ({NOISE_STD_ERRORS:g} x {row.std_error:.2f} = {NOISE_STD_ERRORS * row.std_error:.2f} points "
             f"on {row.n} questions), so the gate cannot tell such a drop from noise")
    if row.allowed_drop == 0:
        return noise + "; a zero tolerance fails any drop, noise included"
    needed = math.ceil(row.n * (NOISE_STD_ERRORS * row.std_error / row.allowed_drop) ** 2)
    return noise + f"; about {needed:,} questions would make it meaningful"


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

    @property
    def warnings(self) -> list[str]:
        """Tolerances within the noise (``noise_warning``): said, never a failure."""
        return [w for w in map(noise_warning, self.rows) if w]


def verdicts(candidate: dict, baseline: dict, tolerances: Tolerances | None = None,
             named: Iterable[str] = ()) -> list[Row]:
    """One row per baseline task (accuracy may drop by its tolerance) and one for held-out perplexity when both
    reports have it (may rise by max_ppl_increase percent). ``named``: the tasks whose tolerance was given
    explicitly (flags), which the reports must hold."""
    tolerances = tolerances or Tolerances()
    cand, base = task_scores(candidate, "the candidate report"), task_scores(baseline, "the baseline report")
    missing = sorted(set(base) - set(cand))
    if missing:
        raise ValueError(f"the candidate report lacks task(s) {missing} that the baseline has; evaluate them too")
    absent = sorted(set(named) - set(base))
    if absent:
        raise ValueError(f"--max-drop names task {absent[0]!r}, which the reports do not hold (tasks present: "
                         f"{', '.join(sorted(base))}); drop it, or evaluate {absent[0]} too")
    if candidate.get("n") != baseline.get("n"):
        raise ValueError(f"the reports scored different numbers of questions ({candidate.get('n')} vs "
                         f"{baseline.get('n')}); use the same --limit")
    rows, counts = [], task_counts(baseline)
    for task in sorted(base):
        drop, n = tolerances.drop(task), counts.get(task)
        rows.append(Row(f"{task} accuracy %", base[task], cand[task], f">= {base[task] - drop:.2f}",
                        cand[task] >= base[task] - drop, drop, n,
                        None if n is None else std_error_of_difference(base[task], cand[task], n)))
    if "perplexity" in candidate and "perplexity" in baseline:
        bound = baseline["perplexity"] * (1 + tolerances.max_ppl_increase / 100)
        rows.append(Row("held-out perplexity", baseline["perplexity"], candidate["perplexity"], f"<= {bound:.3f}",
                        candidate["perplexity"] <= bound))
    return rows


def check(report: dict | str | pathlib.Path, baseline: dict | str | pathlib.Path | None = None,
          tolerances: Tolerances | None = None, named: Iterable[str] = ()) -> CheckResult:
    """Gate ``report`` (an eval report, or the path of its JSON) against ``baseline`` (a report or a path; default:
    the baseline embedded in the report). ``named``: tasks whose tolerance was given explicitly (flags), which the
    reports must hold. Raises ValueError on bad input; a regression is ``passed == False``."""
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
    return CheckResult(tuple(verdicts(report, baseline, tolerances, named)))


def format_rows(rows: Iterable[Row]) -> str:
    """The gate's table; ``SE diff``: the standard error of the accuracy difference, in points."""
    lines = [f"{'measure':<24} {'baseline':>10} {'candidate':>10} {'SE diff':>8} {'allowed':>12}  verdict"]
    for r in rows:
        se = "-" if r.std_error is None else f"{r.std_error:.2f}"
        lines.append(f"{r.measure:<24} {r.baseline:>10.3f} {r.candidate:>10.3f} {se:>8} {r.limit:>12}  "
                     f"{'ok' if r.ok else 'REGRESSION'}")
    return "\n".join(lines)
