"""The evaluation's summary as a short table for the terminal (`santacpu eval` prints it; `--json`
prints the summary itself).

May import: the standard library.
"""

from __future__ import annotations


def _row(name: str, summary: dict, ks) -> str:
    if not summary.get("problems"):
        return f"{name:<32} (no problems scored)"
    rates = "  ".join(f"{summary['pass@k'][k]:>7.3f}" for k in ks)
    statuses = summary["statuses"]
    ran = "/".join(str(statuses.get(s, 0)) for s in ("passed", "failed", "timed out"))
    return f"{name:<32} {rates}  {summary['exact_match']:>11.3f}  {ran}"


def report_lines(result: dict, ks) -> list[str]:
    """`result`: {"model": summary} or, with a reference, {"model", "reference", "comparison"}."""
    mine = result["model"]
    problems = mine.get("problems", 0)
    samples = mine.get("samples", 0)
    head = (f"HumanEval-infilling {mine['benchmark']}: {problems} problem{'s' * (problems != 1)}, "
            f"{samples} sample{'s' * (samples != 1)} each")
    lines = [head, f"{'model':<32} " + "  ".join(f"{'pass@' + str(k):>7}" for k in ks) + "  exact match  programs passed/failed/timed out"]
    lines.append(_row(mine["model"], mine, ks))
    if "reference" in result:
        lines.append(_row(f"{result['reference']['model']} (reference)", result["reference"], ks))
        c = result["comparison"]
        if c.get("problems"):
            error = c["pass@1_difference_se"]
            spread = f"standard error {error:.4f}" if error is not None else "no standard error from one problem"
            lines.append(
                f"same completion as the reference: {100 * c['agreement']:.1f}% of samples; pass@1 difference "
                f"{c['pass@1_difference']:+.4f} ({spread}, {c['problems']} problem{'s' * (c['problems'] != 1)})"
            )
    for summary in [mine] + ([result["reference"]] if "reference" in result else []):
        run = summary["run"]
        speed = f", {run['problems_per_minute']} problems a minute" if run["problems_per_minute"] else ""
        ran = f"{run['problems']} problem{'s' * (run['problems'] != 1)}"
        lines.append(f"{summary['file']}: {ran} run {run['where']} in {run['seconds']} s{speed}")
        if summary.get("truncated_prompts"):
            cut = summary["truncated_prompts"]
            lines.append(f"  {cut} prompt{'s' * (cut != 1)} lost text to fit the model's context")
    return lines
