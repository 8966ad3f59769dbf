"""`cafe evaluate`: every benchmark family of a checkpoint, each its own committed output, then one
metrics file and an HTML report.

    {evaluate.output}/<family>/     metrics.json, results.jsonl (every item's raw result), family extras
    {evaluate.output}/metrics.json  all metrics with stable names, the run, the checkpoint and its digest
    {evaluate.output}/report.html   tables and plots

Embedding families (retrieval, mmeb, gap) read `cafe export`'s files, which must come from the same
checkpoint files (digest check). Generative families (pope, caption, mc) load the checkpoint and generate.
Families run independently (the pipeline runs them as parallel tasks); `merge.merge` combines them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from cafe_core.commit import OutputWriter
from cafe_core.config import CafeConfig
from cafe_core.evaluate import caption as caption_metrics
from cafe_core.evaluate import choice, gap, mmeb, pope, retrieval
from cafe_core.evaluate import sets as eval_sets
from cafe_core.evaluate.export import Embeddings, load_for_inference, mmeb_identity, mmeb_layout, retrieval_identity
from cafe_core.evaluate.identity import set_identity
from cafe_core.evaluate.generate import generate_answers
from cafe_core.evaluate.merge import EvaluationError, header, uncommit
from cafe_core.layout import METRICS_FILE
from cafe_core.model.inputs import InputBuilder
from cafe_core.model.locate import CheckpointRef, locate
from cafe_core.storage import Storage
from cafe_core.train.checkpoint import json_lines
from cafe_core.uris import join


@dataclass
class FamilyResult:
    metrics: dict[str, float]
    results: list[dict[str, Any]]  # raw per-item results
    files: dict[str, bytes]  # extra artifacts (plots)
    tables: list[tuple[str, list[str], list[list[Any]]]]  # report tables: title, header, rows
    sets: dict[str, dict] = field(default_factory=dict)  # what was scored: set -> identity.set_identity


class Context:
    """What the families share: config, store, the checkpoint, lazily the model and the embeddings."""

    def __init__(self, cfg: CafeConfig, store: Storage, progress: bool):
        self.cfg, self.store, self.progress = cfg, store, progress
        self.ref: CheckpointRef = locate(store, cfg.evaluate.checkpoint)
        self._model = self._embeddings = None

    def embeddings(self) -> Embeddings:
        if self._embeddings is None:
            emb = Embeddings(self.store, self.cfg.evaluate.embeddings, self.cfg.evaluate.embedding_cache_mb << 20)
            if emb.checkpoint_digest != self.ref.digest or emb.summary.get("checkpoint") != self.ref.uri:
                raise EvaluationError(
                    f"the embeddings at {self.cfg.evaluate.embeddings} were exported from {emb.summary.get('checkpoint')} "
                    f"(digest {emb.checkpoint_digest}), not from {self.ref.uri} (digest {self.ref.digest}): run `cafe export` "
                    "for this checkpoint first"
                )
            self._embeddings = emb
        return self._embeddings

    def embedded_set(self, key: str, identity: dict, sets: dict[str, dict]) -> Embeddings:
        """The export's embeddings, after checking they were made from exactly these items; records the
        set's identity in ``sets``."""
        emb = self.embeddings()
        emb.check_set(key, identity)
        sets[key] = identity
        return emb

    def generate(self, items: list[tuple[str, bytes]], max_new_tokens: int, desc: str) -> list[str]:
        if self._model is None:
            model, processor, _ = load_for_inference(self.cfg, self.store, self.ref)
            self._model = (model.hf, InputBuilder(processor, self.cfg.export.prompts, 1 << 16, padding_side="left"))
        hf, builder = self._model
        g = self.cfg.evaluate.generation
        return generate_answers(hf, builder, items, max_new_tokens, g.batch_size, desc=desc, progress=self.progress)


# --- families ----------------------------------------------------------------------------------------


def _retrieval(ctx: Context) -> FamilyResult:
    metrics, results, rows, sets = {}, [], [], {}
    for name, uri in ctx.cfg.eval_sets.retrieval.items():
        rs = eval_sets.load_retrieval(ctx.store, uri, name, ctx.cfg.eval_sets.max_items)
        emb = ctx.embedded_set(f"retrieval/{name}", retrieval_identity(rs, uri, ctx.cfg.eval_sets.max_items), sets)
        images = emb.rows([f"retrieval/{name}/image/{i}" for i in range(len(rs.images))])  # read block by block
        texts = emb.rows([f"retrieval/{name}/text/{j}" for j in range(len(rs.captions))])
        e = ctx.cfg.evaluate
        ranks = retrieval.retrieval_ranks(images, texts, rs.caption_image, block_rows=e.block_rows, block_cols=e.block_cols)
        recall = retrieval.recall_at_k(ranks)
        metrics.update({f"retrieval/{name}/{k}": v for k, v in recall.items()})
        results += [{"set": name, "image_id": rs.image_ids[i], "i2t_rank": int(r), "i2t_rank_strict": int(s)}
                    for i, (r, s) in enumerate(zip(ranks.i2t, ranks.i2t_strict))]
        results += [{"set": name, "caption_id": rs.caption_ids[j], "caption": rs.captions[j],
                     "image_id": rs.image_ids[int(rs.caption_image[j])], "t2i_rank": int(r), "t2i_rank_strict": int(s)}
                    for j, (r, s) in enumerate(zip(ranks.t2i, ranks.t2i_strict))]
        rows.append([name, len(rs.images), len(rs.captions), *(recall[k] for k in retrieval_columns())])
    return FamilyResult(metrics, results, {}, [("Zero-shot retrieval", ["set", "images", "captions", *retrieval_columns()], rows)],
                        sets)


def retrieval_columns() -> list[str]:
    """The report's columns: R@1/5/10 both ways (ties by index order), and R@1 with ties against."""
    return [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)] + ["i2t_R@1_strict", "t2i_R@1_strict"]


def _mmeb(ctx: Context) -> FamilyResult:
    s = ctx.cfg.eval_sets
    if not s.mmeb:
        raise EvaluationError("family mmeb needs eval_sets.mmeb")
    per_dataset, strict, results, rows, sets, info = {}, {}, [], [], {}, {}
    for ds in eval_sets.iter_mmeb(ctx.store, s.mmeb, s.max_items):  # one dataset in memory at a time
        layout = mmeb_layout(ds)
        emb = ctx.embedded_set(f"mmeb/{ds.name}", mmeb_identity(ds, layout, s.mmeb, s.max_items), sets)
        hits, strict_hits = mmeb.hits_in_blocks(layout.queries, layout.candidates, emb.get, ctx.cfg.evaluate.block_slots)
        per_dataset[ds.name], strict[ds.name] = float(hits.float().mean()), float(strict_hits.float().mean())
        info[ds.name] = (ds.meta_task, ds.split)
        results += [{"dataset": ds.name, "row": r, "hit": bool(h), "hit_strict": bool(s)}
                    for r, (h, s) in enumerate(zip(hits.tolist(), strict_hits.tolist()))]
        rows.append([ds.name, ds.meta_task, ds.split, len(ds.rows), len(layout.items), per_dataset[ds.name],
                     strict[ds.name]])
        del ds, layout  # before the next dataset is read: one in memory at a time
    metrics = {**mmeb.mmeb_summary(per_dataset, info), **mmeb.mmeb_summary(strict, info, "p@1_strict")}
    return FamilyResult(metrics, results, {}, [
        ("MMEB-style retrieval (P@1)", ["dataset", "meta-task", "split", "rows", "distinct items", "p@1", "p@1_strict"],
         rows)], sets)


def _gap(ctx: Context) -> FamilyResult:
    metrics, files, rows, sets = {}, {}, [], {}
    for n, (name, uri) in enumerate(ctx.cfg.eval_sets.retrieval.items()):
        rs = eval_sets.load_retrieval(ctx.store, uri, name, ctx.cfg.eval_sets.max_items)
        emb = ctx.embedded_set(f"retrieval/{name}", retrieval_identity(rs, uri, ctx.cfg.eval_sets.max_items), sets)
        first_caption = {}
        for j, i in enumerate(rs.caption_image.tolist()):
            first_caption.setdefault(i, j)
        pairs = sorted(first_caption.items())
        image_ids = [f"retrieval/{name}/image/{i}" for i, _ in pairs]
        text_ids = [f"retrieval/{name}/text/{j}" for _, j in pairs]
        out = gap.modality_gap(emb.rows(image_ids), emb.rows(text_ids))
        metrics.update({f"gap/{name}/{k.split('/', 1)[1]}": v for k, v in out.items()})
        if n == 0:  # the headline figure: the first retrieval set
            metrics.update(out)
        shown = gap.sample_pairs(len(pairs), ctx.cfg.evaluate.gap_pairs)  # only the plotted pairs are read
        files[f"gap_{name}.png"] = gap.gap_scatter_png(
            emb.get([image_ids[i] for i in shown]), emb.get([text_ids[i] for i in shown]), max_pairs=len(shown),
            title=f"{len(shown)} image-text pairs (PCA), centroid distance {out['gap/centroid_distance']:.3f}")
        rows.append([name, len(pairs), *out.values()])
    if not rows:
        raise EvaluationError("family gap needs a retrieval set in eval_sets.retrieval")
    return FamilyResult(metrics, [], files, [("Modality gap", ["set", "pairs", *out.keys()], rows)], sets)


def _pope(ctx: Context) -> FamilyResult:
    if not ctx.cfg.eval_sets.pope:
        raise EvaluationError("family pope needs eval_sets.pope")
    g = ctx.cfg.evaluate.generation
    splits = eval_sets.load_pope(ctx.store, ctx.cfg.eval_sets.pope, ctx.cfg.eval_sets.max_items)
    per_split, results, rows, sets = {}, [], [], {}
    for split, questions in splits.items():
        sets[f"pope/{split}"] = set_identity(questions, len(questions), ctx.cfg.eval_sets.pope, ctx.cfg.eval_sets.max_items)
        answers = ctx.generate([(q.question + g.pope_suffix, q.image) for q in questions], g.max_new_tokens, f"pope/{split}")
        predictions = [pope.parse_yes_no(a) for a in answers]
        per_split[split] = pope.pope_metrics([q.label for q in questions], predictions)
        results += [{"split": split, "question_id": q.question_id, "image": q.image_name, "question": q.question,
                     "label": q.label, "answer": a, "parsed": p} for q, a, p in zip(questions, answers, predictions)]
        rows.append([split, len(questions), *per_split[split].values()])
    metrics = pope.pope_summary(per_split)
    header = ["split", "questions", *next(iter(per_split.values())).keys()]
    return FamilyResult(metrics, results, {}, [("POPE (object hallucination, yes = positive)", header, rows)], sets)


def _caption(ctx: Context) -> FamilyResult:
    if not ctx.cfg.eval_sets.caption:
        raise EvaluationError("family caption needs eval_sets.caption")
    g = ctx.cfg.evaluate.generation
    cs = eval_sets.load_caption_set(ctx.store, ctx.cfg.eval_sets.caption, ctx.cfg.eval_sets.max_items)
    texts = ctx.generate([(g.caption_prompt, img) for img in cs.images], g.caption_max_new_tokens, "caption")
    mentioned = [caption_metrics.objects_mentioned(t, cs.vocabulary) for t in texts]
    metrics = caption_metrics.caption_metrics(mentioned, cs.objects, cs.classes)
    results = [{"image": name, "description": t, "mentioned": sorted(m), "truth": sorted(truth)}
               for name, t, m, truth in zip(cs.image_names, texts, mentioned, cs.objects)]
    rows = [[k.split("/", 1)[1], v] for k, v in metrics.items() if not k.startswith("caption/class/")]
    sets = {"caption": set_identity(cs, len(cs.images), ctx.cfg.eval_sets.caption, ctx.cfg.eval_sets.max_items)}
    return FamilyResult(metrics, results, {}, [("Caption hallucination (objects mentioned vs present)", ["metric", "value"], rows)],
                        sets)


def _mc(ctx: Context) -> FamilyResult:
    g = ctx.cfg.evaluate.generation
    metrics, results, rows, sets = {}, [], [], {}
    for name, uri in ctx.cfg.eval_sets.mc.items():
        questions = eval_sets.load_choice(ctx.store, uri, name, ctx.cfg.eval_sets.max_items)
        sets[f"mc/{name}"] = set_identity(questions, len(questions), uri, ctx.cfg.eval_sets.max_items)
        answers = ctx.generate([(q.question + g.mc_suffix, q.image) for q in questions], g.max_new_tokens, f"mc/{name}")
        letters = [choice.extract_letter(a, q.options) for a, q in zip(answers, questions)]
        out = choice.choice_metrics(name, letters, [q.answer for q in questions], [q.category for q in questions])
        metrics.update(out)
        results += [{"set": name, "index": q.index, "answer": q.answer, "generated": a, "letter": l}
                    for q, a, l in zip(questions, answers, letters)]
        rows.append([name, len(questions), out[f"mc/{name}/accuracy"]])
    return FamilyResult(metrics, results, {}, [("Multiple-choice understanding", ["set", "questions", "accuracy"], rows)], sets)


FAMILY_RUNNERS: dict[str, Callable[[Context], FamilyResult]] = {
    "retrieval": _retrieval, "mmeb": _mmeb, "gap": _gap, "pope": _pope, "caption": _caption, "mc": _mc,
}


# --- stage -------------------------------------------------------------------------------------------


def _check_numbers(family: str, metrics: dict[str, float]) -> None:
    bad = [k for k, v in metrics.items() if not isinstance(v, (int, float)) or not math.isfinite(v)]
    if bad:  # recorded as they are; the gate fails closed on them
        print(f"evaluate: warning: {family} produced non-finite metrics: {', '.join(bad)}")


def run_family(cfg: CafeConfig, store: Storage, family: str, progress: bool = True, ctx: Context | None = None) -> dict[str, float]:
    """Evaluate one family and commit `{evaluate.output}/<family>/`. Un-commits the combined output first."""
    ctx = ctx or Context(cfg, store, progress)
    uncommit(store, cfg.evaluate.output)
    result = FAMILY_RUNNERS[family](ctx)
    _check_numbers(family, result.metrics)
    out = OutputWriter(store, join(cfg.evaluate.output, family), kind=f"evaluation-{family}")
    out.put_json(METRICS_FILE, {**header(cfg, ctx.ref), "family": family, "metrics": result.metrics, "sets": result.sets,
                                "tables": [{"title": t, "header": h, "rows": r} for t, h, r in result.tables]})
    out.put_bytes("results.jsonl", json_lines(result.results))
    for name, data in result.files.items():
        out.put_bytes(name, data)
    out.commit(meta={"family": family, "metrics": len(result.metrics), "checkpoint_digest": ctx.ref.digest})
    return result.metrics

