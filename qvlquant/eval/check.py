"""The CI gate: a quantized model's eval report against its full-precision baseline, under per-task tolerances."""

from __future__ import annotations

import dataclasses

DEFAULT_MAX_DROP = 1.0  # accuracy points a task may lose
DEFAULT_MAX_PPL_INCREASE = 2.0  # percent held-out perplexity may rise


@dataclasses.dataclass(frozen=True)
class Row:
    measure: str
    baseline: float
    candidate: float
    limit: str
    ok: bool


def task_scores(report: dict) -> dict[str, float]:
    """task -> accuracy (percent) of an eval report (one task at the top level, more under "tasks")."""
    scores = {name: float(t["accuracy"]) for name, t in report.get("tasks", {}).items()}
    if "task" in report:
        scores[report["task"]] = float(report["accuracy"])
    return scores


def compare(candidate: dict, baseline: dict, max_drop: dict[str, float] | None = None,
            max_ppl_increase: float = DEFAULT_MAX_PPL_INCREASE) -> list[Row]:
    max_drop = max_drop or {}
    cand, base = task_scores(candidate), task_scores(baseline)
    missing = sorted(set(base) - set(cand))
    if missing:
        raise ValueError(f"the candidate report lacks task(s) {missing} that the baseline has; evaluate them too")
    if candidate.get("n") != baseline.get("n"):
        raise ValueError(f"the reports scored different numbers of questions ({candidate.get('n')} vs "
                         f"{baseline.get('n')}); use the same --limit")
    rows = []
    for task in sorted(base):
        drop = max_drop.get(task, DEFAULT_MAX_DROP)
        rows.append(Row(f"{task} accuracy %", base[task], cand[task], f">= {base[task] - drop:.2f}",
                        cand[task] >= base[task] - drop))
    if "perplexity" in candidate and "perplexity" in baseline:
        bound = baseline["perplexity"] * (1 + max_ppl_increase / 100)
        rows.append(Row("held-out perplexity", baseline["perplexity"], candidate["perplexity"], f"<= {bound:.3f}",
                        candidate["perplexity"] <= bound))
    return rows


def format_rows(rows: list[Row]) -> str:
    lines = [f"{'measure':<24} {'baseline':>10} {'candidate':>10} {'allowed':>12}  verdict"]
    for r in rows:
        lines.append(f"{r.measure:<24} {r.baseline:>10.3f} {r.candidate:>10.3f} {r.limit:>12}  {'ok' if r.ok else 'REGRESSION'}")
    return "\n".join(lines)
