"""results.md: the tables as Markdown."""

from __future__ import annotations

from pathlib import Path

from .tables import cross_table, dataset_title, results_table, runs_table


def markdown_table(table: dict) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(esc(c) for c in table["columns"]) + " |",
             "|" + "|".join("---" for _ in table["columns"]) + "|"]
    for row in table["rows"]:
        cells = []
        for c in row["cells"]:
            text = esc(c["text"])
            text = f"**{text}**" if c["bold"] else text
            cells.append(f"*{text}*" if row["kind"] == "reference" and text != "–" else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)



def results_markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"# Experiment: {Path(meta['data_dir']).name}", "", meta["question"], "",
             f"Ranked by {results['selection_by']}, ties by the lower loss there (test numbers are shown, never "
             "used to rank). "
             + ("" if results["has_validation"] else "No validation split: give --val-size to rank on held-out "
                "data. ")
             + ("Mean ± sample std over seeds. " if len(results["seeds"]) > 1 else "")
             + "Best value per column in bold; reference rows in italics.", ""]
    for d in results["datasets"]:
        lines += [f"## {dataset_title(results, d)}", "", markdown_table(results_table(results, d)), ""]
    cross = cross_table(results)
    if cross:
        lines += ["## Across datasets", "", markdown_table(cross), ""]
    if len(results["seeds"]) > 1:
        lines += ["## Every run", "", markdown_table(runs_table(results)), ""]
    if results["mcnemar"]:
        m = results["mcnemar"]
        lines += ["## Paired test of the two best configurations", "",
                  f"McNemar exact test, {m['a_label']} vs {m['b_label']} on {m['n']} shared test images: "
                  f"{m['only_a']} right only by the first, {m['only_b']} only by the second, p = {m['p_value']:.3g}.",
                  ""]
    pending = [r["name"] for r in results["runs"] if not r["finished"]]
    if pending:
        lines += [f"Not finished: {', '.join(pending)}", ""]
    return "\n".join(lines)

