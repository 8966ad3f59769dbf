"""Evaluation: embeddings of every evaluation item, the benchmark families, their merged metrics and
report, and the a_lm:a_con ablation's comparison table."""

from __future__ import annotations

import fnmatch
import math
from typing import Any

from cafe_core.config import FAMILIES, CafeConfig
from cafe_core.errors import BadInput, StageFailed
from cafe_core.layout import METRICS_FILE, RunLayout
from cafe_core.stages.base import Result, committed, stage
from cafe_core.storage import Storage
from cafe_core.uris import join

# The metrics printed in summaries (every metric is in metrics.json and the report).
HEADLINE_METRICS = ("retrieval/", "mmeb/overall", "mmeb/ind", "mmeb/ood", "pope/average/", "caption/overall/",
                    "caption/classwise/", "mc/", "gap/centroid_distance")
# The ablation's families (the generative caption judge adds little to the trade-off; gap: Figure 3).
ABLATION_FAMILIES = ["retrieval", "mmeb", "pope", "mc", "gap"]
# The columns of the ablation table: the retrieval side against the understanding side (Table 7).
ABLATION_COLUMNS = ("retrieval/*/i2t_R@1", "retrieval/*/t2i_R@1", "mmeb/overall/p@1", "pope/average/f1",
                    "pope/average/accuracy", "mc/*/accuracy")


@stage("export", lambda cfg: cfg.export.output)
def export(cfg: CafeConfig, store: Storage, progress: bool = False) -> Result:
    """Embed every evaluation item once with the checkpoint (sharded safetensors + an index). Resumes by shard.
    With export.nproc_per_node > 1 (or 0 and several GPUs) outside torchrun, starts torchrun: each process
    embeds its share of the shards, rank 0 commits."""
    from cafe_core.evaluate.export import export as run
    from cafe_core.evaluate.export import export_ranks
    from cafe_core.train.torchrun import in_torchrun, torchrun

    nproc = cfg.export.processes()
    if nproc > 1 and not in_torchrun():
        print(f"export: {nproc} processes under torchrun", flush=True)
        if torchrun(cfg, store, ["export"], nproc) != 0:
            raise StageFailed(f"an export process failed; finished shards under {cfg.export.output} are kept")
        from cafe_core.commit import read_manifest

        meta = read_manifest(store, cfg.export.output).meta  # rank 0 has printed the summary
        return committed(store, "export", cfg.export.output, "", items=meta["items"], dim=meta["dim"])
    if not in_torchrun():
        r = run(cfg, store, progress=progress)
    else:
        with export_ranks() as ranks:
            r = run(cfg, store, progress=progress, ranks=ranks)
        if r is None:  # not rank 0: rank 0 commits and reports
            return Result("export", cfg.export.output, "")
    reused = f", {r.reused_shards} reused from an interrupted run" if r.reused_shards else ""
    line = f"export: {r.items} embeddings (dim {r.dim}) in {r.shards} shard(s){reused}: {r.output}"
    return committed(store, "export", r.output, line, items=r.items, dim=r.dim)


@stage("evaluate", lambda cfg: cfg.evaluate.output)
def evaluate_family(cfg: CafeConfig, store: Storage, family: str, progress: bool = False,
                    context: Any = None) -> Result:
    """Evaluate one benchmark family, committed at {evaluate.output}/<family>/. `context` (evaluate.run.Context)
    shares the loaded model and embeddings between families run one after another."""
    from cafe_core.evaluate.run import run_family

    metrics = run_family(cfg, store, family, progress=progress, ctx=context)
    uri = join(cfg.evaluate.output, family)
    result = committed(store, "evaluate", uri, f"evaluate: {family}: {len(metrics)} metrics -> {uri}/", family=family)
    result.metrics = metrics
    return result


@stage("evaluate", lambda cfg: cfg.evaluate.output)
def merge_evaluation(cfg: CafeConfig, store: Storage, families: list[str] | None = None) -> Result:
    """Combine the families' outputs into metrics.json (stable names) and report.html. Needs no model."""
    from cafe_core.evaluate.merge import merge
    from cafe_core.evaluate.report import metrics_markdown

    record = merge(cfg, store, families)
    out = cfg.evaluate.output
    line = (f"{metrics_markdown(record['metrics'], HEADLINE_METRICS)}\n"
            f"evaluate: {out}/{METRICS_FILE}  {out}/report.html")
    result = committed(store, "evaluate", out, line, run_id=record["run_id"])
    result.metrics = dict(record["metrics"])
    result.documents["report.html"] = store.read_text(join(out, "report.html"))
    if cfg.ablation is not None:
        result.meta["lm_ratio"] = cfg.ablation.lm_ratio
    return result


@stage("evaluate", lambda cfg: cfg.evaluate.output)
def evaluate(cfg: CafeConfig, store: Storage, families: list[str] | None = None, merge: bool = True,
             progress: bool = False) -> Result:
    """Evaluate a checkpoint on every benchmark family (evaluate.families), then merge them into metrics.json
    and report.html. With merge=False only the families run (one part of a parallel evaluation); with
    families=[] only the merge (of families evaluated before)."""
    if families == [] and merge:
        return merge_evaluation(cfg, store)
    from cafe_core.evaluate.run import Context

    families = list(families or cfg.evaluate.families)
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise BadInput(f"unknown family {', '.join(unknown)}: choose from {', '.join(FAMILIES)}")
    context = Context(cfg, store, progress)  # the model loads once for all generative families
    parts = [evaluate_family(cfg, store, f, progress=progress, context=context) for f in families]
    if not merge:
        return Result("evaluate", cfg.evaluate.output, "\n".join(p.summary for p in parts),
                      metrics={k: v for p in parts for k, v in p.metrics.items()})
    merged = merge_evaluation(cfg, store, families)
    merged.summary = "\n".join([*(p.summary for p in parts), merged.summary])
    return merged


def _cells(values: dict[str, Any]) -> list[Any]:
    numbers = {k: x for k, x in values.items() if isinstance(x, (int, float)) and not isinstance(x, bool)}
    cells = []
    for pattern in ABLATION_COLUMNS:
        found = [numbers[k] for k in sorted(numbers)
                 if fnmatch.fnmatch(k, pattern) and k.count("/") == pattern.count("/")]
        cells.append(found[0] if found else "n/a")
    return cells


LM_ONLY = "LM only"
BASE = "base (not fine-tuned)"


def _setting(output: dict[str, Any]) -> tuple[tuple[int, float], str]:
    """A variant's place (ratios ascending, then LM only, then anything else) and row label."""
    ratio = output.get("lm_ratio", "n/a")
    if isinstance(ratio, (int, float)):
        return (0, float(ratio)), f"{ratio:g}"
    return ((1, 0.0), LM_ONLY) if ratio is None else ((3, 0.0), str(ratio))


@stage("compare", lambda cfg: RunLayout(cfg.root, cfg.run_id).ablation)
def compare_ablation(cfg: CafeConfig, store: Storage, variants: list[dict[str, Any]]) -> Result:
    """Compare the a_lm:a_con variants (and the LM-only one) in one table and one plot, the starting model's card
    as a reference row, with the modality-gap scatter before (the base's card) and after fine-tuning (the
    configured ratio's variant), at {run}/ablation/. `variants` are the variants' evaluation artifacts' metadata:
    the logged metrics, and under "cafe_output" the run id and lm_ratio (from each variant's config)."""
    from cafe_core.commit import OutputWriter
    from cafe_core.evaluate.report import image_html, table
    from cafe_core.stages.pretrain import card_metrics

    outputs = [v.get("cafe_output", {}) for v in variants]  # each variant's Result.metadata()
    keyed = [(*_setting(o), str(o.get("run_id", "?")), *_cells(v)) for v, o in zip(variants, outputs)]
    base = card_metrics(cfg, store)
    if base is not None:
        keyed.append(((2, 0.0), BASE, str(cfg.model.checkpoint), *_cells(base)))
    rows = [list(row[1:]) for row in sorted(keyed, key=lambda row: row[0])]
    header = ["a_lm:a_con", "run", *ABLATION_COLUMNS]
    fmt = lambda x: f"{x:.4f}" if isinstance(x, float) else str(x)  # noqa: E731
    images = {"ablation.png": ablation_plot_png(header, rows)}
    images.update(_gap_before_after(cfg, store, outputs))
    markdown = "\n".join(["# a_lm:a_con ablation (retrieval vs understanding)", "",
                          "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                          *("| " + " | ".join(fmt(c) for c in r) + " |" for r in rows), "",
                          *(f"![{name}]({name})" for name in images)]) + "\n"
    pictures = "".join(image_html(name, png) for name, png in images.items())
    html = ("<!doctype html><html><head><meta charset='utf-8'><title>cafe ablation</title></head><body>"
            "<h1>a_lm:a_con ablation</h1>" + table(header, rows) + pictures + "</body></html>")
    uri = RunLayout(cfg.root, cfg.run_id).ablation
    out = OutputWriter(store, uri, kind="ablation")
    out.put_text("comparison.md", markdown)
    out.put_text("comparison.html", html)
    out.put_json("variants.json", variants)
    for name, png in images.items():
        out.put_bytes(name, png)
    out.commit(meta={"variants": len(variants), "images": sorted(images)})
    result = committed(store, "compare", uri, f"{markdown}\ncompare: {len(variants)} variants -> {uri}/comparison.md")
    result.documents = {"comparison.md": markdown, "comparison.html": html}
    return result


def ablation_plot_png(header: list[str], rows: list[list[Any]]) -> bytes:
    """Retrieval i2t R@1 against POPE accuracy and against multiple-choice accuracy, one point per setting
    (the paper's Table 7 as a picture); the base a star."""
    from cafe_core.train.plots import figure_png

    column = {pattern: header.index(pattern) for pattern in ABLATION_COLUMNS}
    x_col = column["retrieval/*/i2t_R@1"]
    panels = (("POPE accuracy", column["pope/average/accuracy"]), ("multiple-choice accuracy", column["mc/*/accuracy"]))

    def draw(fig):
        for i, (label, y_col) in enumerate(panels):
            ax = fig.add_subplot(1, 2, i + 1)
            for row in rows:
                x, y = row[x_col], row[y_col]
                if not (isinstance(x, (int, float)) and isinstance(y, (int, float))):
                    continue
                ax.scatter([x], [y], marker="*" if row[0] == BASE else "o", s=120 if row[0] == BASE else 40,
                           label=row[0], alpha=0.85)
            if ax.collections:  # labels by the points overlap; a family not evaluated leaves a panel empty
                ax.legend(fontsize=7, loc="best", title="a_lm:a_con", title_fontsize=7)
            ax.set_xlabel("retrieval i2t R@1")
            ax.set_ylabel(label)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        fig.suptitle("a_lm:a_con: retrieval against understanding")

    return figure_png(draw, (10, 4.2))


def gap_png(cfg: CafeConfig) -> str:
    """The file name of the modality-gap scatter of the first retrieval set (the gap family's headline)."""
    return f"gap_{next(iter(cfg.eval_sets.retrieval), '')}.png"


def _gap_before_after(cfg: CafeConfig, store: Storage, outputs: list[dict[str, Any]]) -> dict[str, bytes]:
    """The modality-gap scatters: the base's (beside its card, when it has one) and that of the variant at the
    configured ratio (the paper's 1:10 by default), else the first variant's; the file name says which."""
    from cafe_core.model.build import checkpoint_location

    images: dict[str, bytes] = {}
    if cfg.model.checkpoint is not None:
        before = join(checkpoint_location(cfg.model.checkpoint), gap_png(cfg))
        if store.exists(before):
            images["gap_before.png"] = store.read_bytes(before)
    loss = cfg.train.loss
    wanted = loss.a_lm / loss.a_con if loss.a_con else None
    after = [o for o in outputs if isinstance(o.get("lm_ratio"), (int, float)) and wanted is not None
             and math.isclose(o["lm_ratio"], wanted, rel_tol=1e-9)] or outputs[:1]
    if after and "run_id" in after[0]:
        uri = join(RunLayout(cfg.root, after[0]["run_id"]).evaluate, "gap", gap_png(cfg))
        if store.exists(uri):
            images[f"gap_after_{after[0]['run_id']}.png"] = store.read_bytes(uri)
    return images
