"""Evaluation reports: JSON for machines, a Markdown table and a PNG plot for people."""

from __future__ import annotations

from pathlib import Path

from core.files import write_json_atomic, write_text_atomic
from core.metrics import metric_names
from training.evaluate import EvalResult

LABELS = {"ndcg@10": "NDCG@10", "mrr@10": "MRR@10", "recall@1": "R@1", "recall@10": "R@10", "recall@100": "R@100"}


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def comparison_table(results: list[EvalResult], metric: str = "ndcg@10") -> str:
    """One row per dimension: each model's metric and its share of that model's full-dimension value."""
    dims = sorted({dim for result in results for dim in result.by_dim}, reverse=True)
    header = ["dim"]
    for result in results:
        header += [f"{result.model} {LABELS[metric]}", "% of full"]
    if len(results) == 2:
        header.append("Δ")
    lines = [_row(header), _row(["---:"] * len(header))]
    for dim in dims:
        cells = [str(dim)]
        values = []
        for result in results:
            if dim not in result.by_dim:
                cells += ["–", "–"]
                values.append(None)
                continue
            value, full = result.metric(dim, metric), result.metric(result.full_dim, metric)
            cells += [f"{value:.3f}", f"{100 * value / full:.1f}%" if full else "–"]
            values.append(value)
        if len(results) == 2:
            cells.append(f"{values[1] - values[0]:+.3f}" if None not in values else "–")
        lines.append(_row(cells))
    return "\n".join(lines)


def detail_table(result: EvalResult) -> str:
    """Every metric at every dimension for one model."""
    names = metric_names()
    lines = [_row(["dim", *(LABELS[n] for n in names)]), _row(["---:"] * (len(names) + 1))]
    for dim in sorted(result.by_dim, reverse=True):
        lines.append(_row([str(dim), *(f"{result.by_dim[dim][n]:.3f}" for n in names)]))
    return "\n".join(lines)


def markdown_report(results: list[EvalResult], title: str = "Retrieval quality per dimension") -> str:
    first = results[0]
    parts = [
        f"# {title}",
        "",
        f"Dataset `{first.dataset}`, split `{first.split}`: {first.num_queries} queries, "
        f"{first.num_documents} documents. Exact search; each dimension is the full embedding "
        "truncated, then L2-normalised.",
        "",
        comparison_table(results),
    ]
    parts += views_section(results)
    for result in results:
        parts += ["", f"## {result.model}", "", detail_table(result)]
    return "\n".join(parts) + "\n"


def views_section(results: list[EvalResult]) -> list[str]:
    """The clean and shared views' tables, when every result has them (a training split was given)."""
    if not results or not all(result.views for result in results):
        return []
    clean, shared = results[0].views["clean"]["num_queries"], results[0].views["shared"]["num_queries"]
    return [
        "",
        "## Clean view: questions whose answers were never training positives",
        "",
        f"{shared} of the {results[0].num_queries} questions have a relevant document that is also a positive of "
        "the training split: a model tuned on it has seen those documents as answers, so its gain there is partly "
        f"memorised. The {clean} others are the clean view; judge a tuned model by it.",
        "",
        comparison_table([result.view("clean") for result in results]),
        "",
        f"Shared view ({shared} questions):",
        "",
        comparison_table([result.view("shared") for result in results]),
    ]


def plot_ndcg(results: list[EvalResult], path: Path, metric: str = "ndcg@10") -> None:
    """Draw the metric against dimension (log2 axis), one line per model, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for result in results:
        dims = sorted(result.by_dim)
        ax.plot(dims, [result.metric(d, metric) for d in dims], marker="o", label=result.model)
    all_dims = sorted({d for r in results for d in r.by_dim})
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_dims, [str(d) for d in all_dims])
    ax.set_xlabel("embedding dimension (truncated, re-normalised)")
    ax.set_ylabel(LABELS[metric])
    ax.set_title(f"{LABELS[metric]} vs dimension — {results[0].dataset} ({results[0].split})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def write_eval_report(results: list[EvalResult], folder: Path, stem: str = "eval") -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>_ndcg.png`` into ``folder``; return the paths."""
    json_path, md_path, png_path = folder / f"{stem}.json", folder / f"{stem}.md", folder / f"{stem}_ndcg.png"
    write_json_atomic(json_path, {"results": [r.to_dict() for r in results]})
    write_text_atomic(md_path, markdown_report(results))
    plot_ndcg(results, png_path)
    return [json_path, md_path, png_path]
