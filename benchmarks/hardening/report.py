"""The campaign's tally: per category, cases tried and passed, then one line per failure (text and Markdown)."""

from __future__ import annotations

from collections import Counter

from benchmarks.hardening.common import Result


def tally(results: list[Result]) -> list[tuple[str, int, int]]:
    tried, passed = Counter(), Counter()
    for result in results:
        tried[result.category] += 1
        passed[result.category] += result.ok
    return [(category, tried[category], passed[category]) for category in tried]


def as_text(results: list[Result]) -> str:
    rows = tally(results)
    width = max([len("category"), *(len(c) for c, _, _ in rows)])
    lines = [f"{'category':<{width}}  {'tried':>6}  {'passed':>6}  {'failed':>6}"]
    lines += [f"{c:<{width}}  {t:>6}  {p:>6}  {t - p:>6}" for c, t, p in rows]
    total_tried, total_passed = sum(t for _, t, _ in rows), sum(p for _, _, p in rows)
    lines.append(f"{'total':<{width}}  {total_tried:>6}  {total_passed:>6}  {total_tried - total_passed:>6}")
    failures = [r for r in results if not r.ok]
    if failures:
        lines += ["", "failures:"]
        lines += [f"  [{r.category}] {r.name}: {r.detail}" for r in failures]
    return "\n".join(lines)


def as_markdown(results: list[Result], header: str = "") -> str:
    rows = tally(results)
    lines = [header, ""] if header else []
    lines += ["| category | cases tried | passed | failed |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {c} | {t} | {p} | {t - p} |" for c, t, p in rows]
    total_tried, total_passed = sum(t for _, t, _ in rows), sum(p for _, _, p in rows)
    lines.append(f"| **total** | **{total_tried}** | **{total_passed}** | **{total_tried - total_passed}** |")
    failures = [r for r in results if not r.ok]
    if failures:
        lines += ["", "Failures:", ""]
        lines += [f"- `{r.category}` {r.name}: {_md(r.detail)}" for r in failures]
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
