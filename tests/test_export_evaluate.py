"""Export and evaluation on a tiny untrained model (local storage): the files, resume by shard, the
stale-export check, every family's metric names, raw results and the report."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from cafe_core.commit import OutputWriter, read_manifest, verify_output
from cafe_core.config import ModelConfig, load_config
from cafe_core.data.synth import generate
from cafe_core.errors import BadInput
from cafe_core.evaluate import export as export_module
from cafe_core.evaluate.export import Embeddings, ExportError, export, mmeb_layout
from cafe_core.evaluate.sets import MmebDataset, load_mmeb
from cafe_core.model.inputs import InputBuilder
from cafe_core.model.locate import locate
from cafe_core.model.build import build, save
from cafe_core.stages.evaluate import evaluate
from cafe_core.stages.evaluate import export as export_stage
from cafe_core.storage import Storage

pytestmark = pytest.mark.slow


def write_model(store: Storage, prefix: str, seed: int) -> str:
    """A committed output shaped like `cafe train`'s final/: the HF folder under model/."""
    model, processor = build(ModelConfig(init_seed=seed))
    with tempfile.TemporaryDirectory() as tmp:
        save(model, processor, Path(tmp), cafe_config_yaml="{}", metrics={})
        return commit_folder(store, Path(tmp), prefix)


def commit_folder(store: Storage, folder: Path, prefix: str) -> str:
    """A local model folder as `cafe train`'s committed final/ output (the HF folder under model/)."""
    out = OutputWriter(store, prefix, kind="trained-model")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        out.put_file(f"model/{path.relative_to(folder).as_posix()}", path)
    out.commit(meta={"steps": 0})
    return prefix


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    cfg = load_config("configs/local.yaml", [
        f"root={root}", "run_id=e1", "synth.train_size=4", "synth.retrieval_images=6", "synth.pope_images=2",
        "synth.mmeb_rows_per_dataset=2", "synth.mc_questions=3", "synth.caption_images=2",
        "export.shard_size=16", "export.batch_size=8", "evaluate.generation.caption_max_new_tokens=12",
        "evaluate.gap_pairs=6",
    ])
    store = Storage()
    generate(cfg.synth, store)
    write_model(store, cfg.export.checkpoint, seed=0)
    return cfg, store


def test_export_writes_committed_shards_and_an_index_and_resumes_by_shard(world):
    cfg, store = world
    first = export(cfg, store, progress=False)
    manifest = verify_output(store, cfg.export.output)
    assert first.shards > 2 and first.reused_shards == 0
    assert manifest.meta["items"] == first.items and "index.parquet" in manifest.names()
    emb = Embeddings(store, cfg.export.output)
    ids = list(emb.index["id"])
    matrix = emb.get(ids)
    assert matrix.shape == (first.items, first.dim)
    torch.testing.assert_close(matrix.norm(dim=-1), torch.ones(first.items))
    assert ids[0] == "retrieval/shapes/image/0" and any(i.startswith("mmeb/") for i in ids)
    assert "retrieval/shapes/text/29" in ids  # 6 images x 5 captions, flattened
    assert set(emb.index["modality"]) == {"image", "text", "interleaved"}

    # An interrupted export: the manifest and the last shard are gone; the rest is reused, same numbers.
    last = f"{cfg.export.output}/shards/shard-{first.shards - 1:05d}"
    store.delete(f"{cfg.export.output}/_MANIFEST.json")
    store.delete(f"{last}.safetensors")
    again = export(cfg, store, progress=False)
    assert again.reused_shards == first.shards - 1
    torch.testing.assert_close(Embeddings(store, cfg.export.output).get(ids), matrix)


def test_an_export_resumed_by_code_that_tokenises_prompts_otherwise_reuses_nothing(world, monkeypatch):
    cfg, store = world
    first = export(cfg, store, progress=False)
    store.delete(f"{cfg.export.output}/_MANIFEST.json")  # interrupted
    monkeypatch.setattr(export_module, "PROMPT_ENCODING", export_module.PROMPT_ENCODING + 1)
    assert export(cfg, store, progress=False).reused_shards == 0 < first.shards


def test_export_of_another_checkpoint_recomputes_and_evaluate_refuses_a_stale_export(world, tmp_path):
    cfg, store = world
    other = cfg.model_copy(deep=True)
    other.export.checkpoint = write_model(store, str(tmp_path / "other"), seed=1)
    other.export.output = str(tmp_path / "export-other")
    export(other, store, progress=False)
    # evaluate the first checkpoint against the other checkpoint's embeddings: refused, with the fix
    mixed = cfg.model_copy(deep=True)
    mixed.evaluate.embeddings = other.export.output
    mixed.evaluate.output = str(tmp_path / "evaluate-mixed")
    with pytest.raises(BadInput, match="run `cafe export`"):
        evaluate(mixed, store, families=["retrieval"], progress=False)


def test_evaluate_records_the_items_it_scored_and_refuses_embeddings_of_other_items(world, tmp_path):
    cfg, store = world
    export(cfg, store, progress=False)
    exported = Embeddings(store, cfg.export.output).summary["sets"]
    assert set(exported) == {"retrieval/shapes"} | {k for k in exported if k.startswith("mmeb/")} and len(exported) > 2
    assert exported["retrieval/shapes"]["items"] == 6 + 30 and exported["retrieval/shapes"]["max_items"] is None
    scored = cfg.model_copy(deep=True)
    scored.evaluate.output = str(tmp_path / "scored")
    record = store.read_json(evaluate(scored, store, families=["retrieval", "mc"], progress=False).uri + "/metrics.json")
    assert record["sets"]["retrieval/shapes"] == exported["retrieval/shapes"]  # the same items, the same digest
    assert record["sets"]["mc/mmstar"]["items"] == 3
    # The same sets cut to 4 items (eval_sets.max_items) are other items: the export does not serve them.
    cut = scored.model_copy(deep=True)
    cut.eval_sets.max_items = 4
    cut.evaluate.output = str(tmp_path / "cut")
    with pytest.raises(BadInput, match=r"other items than evaluate scores: retrieval/shapes: 24 items .*max_items 4\) vs 36"):
        evaluate(cut, store, families=["retrieval"], progress=False)
    # An export written before identities were recorded vouches for nothing: refused, with the fix.
    older = Embeddings(store, cfg.export.output)
    del older.summary["sets"]
    with pytest.raises(ExportError, match="records no evaluation-set identities .* run `cafe export` again"):
        older.check_set("retrieval/shapes", exported["retrieval/shapes"])


def test_evaluate_every_family_writes_metrics_results_and_report(world):
    cfg, store = world
    export(cfg, store, progress=False)
    record = store.read_json(evaluate(cfg, store, progress=False).uri + "/metrics.json")
    manifest = verify_output(store, cfg.evaluate.output)
    names = manifest.names()
    for family in ("retrieval", "mmeb", "pope", "caption", "mc", "gap"):
        assert f"{family}/metrics.json" in names and f"{family}/_MANIFEST.json" in names
    assert "report.html" in names and "gap/gap_shapes.png" in names
    m = record["metrics"]
    for key in ("retrieval/shapes/i2t_R@1", "retrieval/shapes/t2i_R@10", "mmeb/overall/p@1", "pope/random/f1",
                "pope/average/yes_ratio", "caption/classwise/f0.5", "mc/mmstar/accuracy", "gap/centroid_distance"):
        assert key in m and 0 <= m[key] <= 2, key
    assert m["retrieval/shapes/i2t_R@10"] >= m["retrieval/shapes/i2t_R@1"]
    assert record["run_id"] == "e1" and record["checkpoint_digest"] == read_manifest(store, cfg.export.output).meta["checkpoint_digest"]
    pope_rows = [json.loads(line) for line in store.read_text(f"{cfg.evaluate.output}/pope/results.jsonl").splitlines()]
    assert pope_rows and all({"question", "answer", "parsed", "label"} <= set(r) for r in pope_rows)
    report = store.read_text(f"{cfg.evaluate.output}/report.html")
    assert "Zero-shot retrieval" in report and "POPE" in report and "data:image/png;base64," in report


def test_export_without_sets_is_refused(world, tmp_path):
    cfg, store = world
    empty = cfg.model_copy(deep=True)
    empty.eval_sets.retrieval = {}
    empty.eval_sets.mmeb = None
    empty.export.output = str(tmp_path / "x")
    with pytest.raises(ExportError, match="nothing to export"):
        export(empty, store, progress=False)


def test_mmeb_items_are_embedded_once_and_score_as_every_slot_embedded_apart(world, tmp_path):
    cfg, store = world
    export(cfg, store, progress=False)
    emb = Embeddings(store, cfg.export.output)
    datasets = load_mmeb(store, cfg.eval_sets.mmeb)
    slots = [(ds.name, r, k, content) for ds in datasets for r, row in enumerate(ds.rows)
             for k, content in enumerate([(row.qry_text, row.qry_image), *row.candidates])]
    pooled = [i for i in emb.index["id"] if i.startswith("mmeb/item/")]
    assert emb.summary["mmeb"]["slots"] == len(slots) > emb.summary["mmeb"]["items"] == len(pooled)
    assert len(pooled) == len({content for *_, content in slots})  # forwards = distinct (text, image) pairs

    # Every slot embedded on its own by the model: the same scores as evaluate's pooled, blockwise ones.
    model, processor, device = export_module.load_for_inference(cfg, store, locate(store, cfg.export.checkpoint))
    builder = InputBuilder(processor, cfg.export.prompts, cfg.export.max_length)
    apart = export_module.embed_items(model, builder, [export_module.Item(f"{n}/{r}/{k}", "interleaved", "x", *c)
                                                       for n, r, k, c in slots], 4, device)
    scored = cfg.model_copy(deep=True)
    scored.evaluate.output = str(tmp_path / "scored")
    scored.evaluate.block_slots = 5  # several blocks per dataset
    out = evaluate(scored, store, families=["mmeb"], progress=False).uri
    results = [json.loads(line) for line in store.read_bytes(f"{out}/mmeb/results.jsonl").splitlines()]
    at = 0
    for ds in datasets:
        for r, row in enumerate(ds.rows):
            n = 1 + len(row.candidates)
            layout = mmeb_layout(MmebDataset(ds.name, ds.meta_task, ds.split, [row]))
            ours = (emb.get(layout.queries) @ emb.get(layout.candidates[0]).T)[0]
            theirs = apart[at + 1: at + n] @ apart[at]
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
            hit = next(x for x in results if x["dataset"] == ds.name and x["row"] == r)
            assert hit["hit"] == bool((ours[1:] <= ours[0]).all()) and hit["hit_strict"] == bool((ours[1:] < ours[0]).all())
            at += n


def test_the_shard_reader_keeps_a_bounded_cache(world):
    cfg, store = world
    first = export(cfg, store, progress=False)
    full = Embeddings(store, cfg.export.output)
    ids = list(full.index["id"])
    reference = full.get(ids)
    small = Embeddings(store, cfg.export.output, cache_bytes=1)  # one shard at a time
    order = ids[::-1] + ids[::3]
    torch.testing.assert_close(small.get(order), reference[[ids.index(i) for i in order]])
    assert len(small._cache) == 1 and small.shard_reads >= first.shards
    view = full.rows(ids[5:40])
    assert len(view) == 35
    torch.testing.assert_close(view[10:20], reference[15:25])
    with pytest.raises(ExportError, match="has no embedding for 'retrieval/shapes/image/999'"):
        full.rows(["retrieval/shapes/image/999"])


def test_two_processes_export_what_one_does(world, tmp_path):
    cfg, store = world
    one = export(cfg, store, progress=False)
    two = cfg.model_copy(deep=True)
    two.export.output = str(tmp_path / "export-2")
    two.export.nproc_per_node = 2
    result = export_stage(two, store)  # starts torchrun: two processes, each its share of the shards
    assert result.meta["items"] == one.items
    a, b = Embeddings(store, cfg.export.output), Embeddings(store, two.export.output)
    assert a.index == b.index and a.summary["sets"] == b.summary["sets"] and b.summary["world"] == 2
    torch.testing.assert_close(b.get(b.index["id"]), a.get(a.index["id"]), atol=1e-5, rtol=0)
    writers = [store.read_json(f"{two.export.output}/shards/shard-{k:05d}.json")["rank"] for k in range(one.shards)]
    assert writers == [k % 2 for k in range(one.shards)]
    verify_output(store, two.export.output)


def test_rank_0_commits_only_when_every_other_rank_s_shard_is_there(world, tmp_path):
    cfg, store = world
    alone = cfg.model_copy(deep=True)
    alone.export.output = str(tmp_path / "export-alone")
    # rank 0 of two, but rank 1 never ran: its shards are missing, so nothing is committed
    with pytest.raises(ExportError, match=r"shard 1 of .* \(rank 1's\) is missing"):
        export(alone, store, progress=False, ranks=export_module.Ranks(rank=0, world=2))
    assert not store.exists(f"{alone.export.output}/_MANIFEST.json")
    # rank 1 writes its shards and commits nothing; then rank 0 reuses its own and takes rank 1's
    assert export(alone, store, progress=False, ranks=export_module.Ranks(rank=1, world=2)) is None
    assert not store.exists(f"{alone.export.output}/_MANIFEST.json")
    done = export(alone, store, progress=False, ranks=export_module.Ranks(rank=0, world=2))
    assert done.reused_shards == (done.shards + 1) // 2
    verify_output(store, alone.export.output)


def test_retrieval_and_gap_read_the_export_in_blocks_and_score_as_a_whole(world, tmp_path):
    cfg, store = world
    export(cfg, store, progress=False)
    got = {}
    for name, rows, cols in (("whole", 1024, 4096), ("blocks", 2, 7)):
        c = cfg.model_copy(deep=True)
        c.evaluate.output = str(tmp_path / name)
        c.evaluate.block_rows, c.evaluate.block_cols = rows, cols
        out = evaluate(c, store, families=["retrieval", "gap"], progress=False).uri
        got[name] = store.read_json(f"{out}/metrics.json")["metrics"]
        got[name + "/results"] = store.read_bytes(f"{out}/retrieval/results.jsonl")
    assert got["blocks"] == got["whole"] and got["blocks/results"] == got["whole/results"]
