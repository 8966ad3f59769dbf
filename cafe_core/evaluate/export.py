"""`cafe export`: embed every evaluation item once; evaluation reads these files instead of re-encoding.

Output (one committed output, `_MANIFEST.json`):
- `shards/shard-NNNNN.safetensors`: tensor `embeddings` [n, dim] float32, L2-normalised, rows in index order;
- `shards/shard-NNNNN.json`: what the shard holds (item-id digest, checkpoint digest, prompt digest), so an
  interrupted export resumes by shard: a shard whose description matches is kept, not recomputed;
- `index.parquet`: id, modality (image | text | interleaved), set, shard, row;
- `export.json`: checkpoint, its digest, counts per set and modality, dimension, the sets' identities, and
  for MMEB the candidate slots against the distinct items embedded.

Item ids are stable: `retrieval/<set>/image/<i>`, `retrieval/<set>/text/<j>` (the j-th caption, flattened in
file order). MMEB items are content-addressed, `mmeb/item/<sha256 of text and image bytes>`: a query or
candidate that occurs in many rows or datasets (MMEB's class names, its shared candidate pools) is embedded
once, and evaluation maps each row's query and candidates to these ids (`mmeb_layout`). Both sides of an
MMEB row go through the same interleaved prompt, so equal content means an equal embedding.

Items are read one set at a time and embedded shard by shard, so memory holds one set's content, one shard and
the index, whatever the number of sets. Under torchrun each rank embeds the shards k with k % world == rank;
rank 0 then commits them all through the resume check (`_reusable`), which also verifies every shard.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import os
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

from cafe_core.commit import ManifestEntry, OutputWriter, read_manifest
from cafe_core.config import CafeConfig, PromptConfig
from cafe_core.errors import BadInput
from cafe_core.evaluate import sets as eval_sets
from cafe_core.evaluate.identity import content_digest, differences, set_identity
from cafe_core.model.inputs import InputBuilder
from cafe_core.model.joint import CafeModel
from cafe_core.model.locate import CheckpointRef, locate, model_config_for
from cafe_core.storage import Storage
from cafe_core.uris import join, sha256_bytes

INDEX_SCHEMA = pa.schema([("id", pa.string()), ("modality", pa.string()), ("set", pa.string()),
                          ("shard", pa.int32()), ("row", pa.int32())])
MODALITIES = ("image", "text", "interleaved")


class ExportError(BadInput, ValueError):
    pass


@dataclass(frozen=True)
class Item:
    id: str
    modality: str  # image | text | interleaved
    set: str
    text: str | None = None
    image: bytes | None = None


# --- what to embed -----------------------------------------------------------------------------------


def retrieval_items(rs) -> list[Item]:
    name = f"retrieval/{rs.name}"
    return ([Item(f"{name}/image/{i}", "image", name, image=img) for i, img in enumerate(rs.images)]
            + [Item(f"{name}/text/{j}", "text", name, text=c) for j, c in enumerate(rs.captions)])


def retrieval_identity(rs, uri: str, max_items: int | None) -> dict:
    return set_identity(rs, len(rs.images) + len(rs.captions), uri, max_items)


def mmeb_identity(ds, layout: "MmebLayout", uri: str, max_items: int | None) -> dict:
    """The dataset's identity from its layout: the item keys already digest each text and image, and each
    image is hashed once, not once per slot (MMEB repeats an image in up to a million slots)."""
    content = {"name": ds.name, "meta_task": ds.meta_task, "split": ds.split, "queries": layout.queries,
               "candidates": layout.candidates}
    return set_identity(content, len(ds.rows), uri, max_items)


@dataclass
class MmebLayout:
    """One MMEB dataset as references to content-addressed items."""

    queries: list[str]  # item id of each row's query
    candidates: list[list[str]]  # item ids of each row's candidates, the positive first
    items: dict[str, tuple[str, bytes | None]] = field(default_factory=dict)  # distinct id -> (text, image)

    @property
    def slots(self) -> int:
        """Queries plus candidates: what embedding every slot apart would cost."""
        return len(self.queries) + sum(len(c) for c in self.candidates)


def mmeb_layout(ds) -> MmebLayout:
    image_digests: dict[bytes, str] = {}  # images repeat across rows (a shared pool): hash each once
    keys: dict[tuple[str, str | None], str] = {}
    items: dict[str, tuple[str, bytes | None]] = {}

    def item(text: str, image: bytes | None) -> str:
        digest = None
        if image is not None:
            digest = image_digests.get(image)
            if digest is None:
                digest = image_digests[image] = hashlib.sha256(image).hexdigest()
        key = keys.get((text, digest))
        if key is None:
            key = keys[(text, digest)] = f"mmeb/item/{content_digest((text, digest))}"
            items[key] = (text, image)
        return key

    queries = [item(row.qry_text, row.qry_image) for row in ds.rows]
    candidates = [[item(t, img) for t, img in row.candidates] for row in ds.rows]
    return MmebLayout(queries, candidates, items)


@dataclass
class ExportPlan:
    """What `iter_items` found besides the items: each set's identity and MMEB's slots against items."""

    identities: dict[str, dict] = field(default_factory=dict)
    mmeb: dict[str, dict] = field(default_factory=dict)  # dataset -> rows, slots, new distinct items


def iter_items(cfg: CafeConfig, store: Storage, plan: ExportPlan | None = None) -> Iterator[Item]:
    """Every item of the configured embedding sets (retrieval and MMEB) in a stable order, each distinct MMEB
    item once, reading one set at a time; ``plan`` collects the sets' identities and MMEB's counts."""
    s = cfg.eval_sets
    plan = ExportPlan() if plan is None else plan
    for name, uri in s.retrieval.items():
        rs = eval_sets.load_retrieval(store, uri, name, s.max_items)
        plan.identities[f"retrieval/{name}"] = retrieval_identity(rs, uri, s.max_items)
        yield from retrieval_items(rs)
    if s.mmeb:
        seen: set[str] = set()
        for ds in eval_sets.iter_mmeb(store, s.mmeb, s.max_items):
            layout = mmeb_layout(ds)
            plan.identities[f"mmeb/{ds.name}"] = mmeb_identity(ds, layout, s.mmeb, s.max_items)
            new = [key for key in layout.items if key not in seen]
            plan.mmeb[ds.name] = {"rows": len(ds.rows), "slots": layout.slots, "new_items": len(new)}
            seen.update(new)
            for key in new:
                text, image = layout.items[key]
                yield Item(key, "interleaved", "mmeb", text=text, image=image)
            del ds, layout, new  # before the next dataset is read: one in memory at a time


# --- embedding ---------------------------------------------------------------------------------------


def embed_items(model: CafeModel, builder: InputBuilder, items: Sequence[Item], batch_size: int,
                device: torch.device) -> torch.Tensor:
    """Embeddings [len(items), dim] float32 on CPU, in the order of `items`. Items are batched by modality
    and, within it, by text length, so a batch pads to similar lengths; results return to item order."""
    order = sorted(range(len(items)), key=lambda i: (MODALITIES.index(items[i].modality), items[i].image is None,
                                                     len(items[i].text or "")))
    out: list[torch.Tensor] = []
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and j - i < batch_size and items[order[j]].modality == items[order[i]].modality:
            j += 1
        chunk = [items[k] for k in order[i:j]]
        kind = chunk[0].modality
        if kind == "image":
            batch = builder.images_batch([it.image for it in chunk])
        elif kind == "text":
            batch = builder.texts_batch([it.text for it in chunk])
        else:
            batch = builder.interleaved_batch([(it.text or "", it.image) for it in chunk])
        with torch.no_grad():
            emb = model(batch.to(device), mode="embed")
        out.append(emb.float().cpu())
        i = j
    result = torch.empty(len(items), out[0].shape[1]) if out else torch.zeros(0, 0)
    if out:
        result[torch.tensor(order)] = torch.cat(out)
    return result


def load_for_inference(cfg: CafeConfig, store: Storage, ref: CheckpointRef, precision: str = "auto", folder=None):
    """(CafeModel in eval mode on the device, processor, device). bf16 on a GPU unless told otherwise. Under
    torchrun each process takes the GPU of its local rank."""
    from cafe_core.model.build import build  # transformers: only the tasks that load a model pay for it
    from cafe_core.train.distributed import training_device

    device = training_device(int(os.environ.get("LOCAL_RANK", "0")))
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type != "cuda":
        raise ExportError("precision bf16 needs a GPU; use fp32 (or auto) on this machine")
    mcfg = model_config_for(ref, cfg.model, folder).model_copy(
        update={"dtype": "bfloat16" if precision == "bf16" else "float32"})
    hf, processor = build(mcfg, store)
    return CafeModel(hf).to(device).eval(), processor, device


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# Bump when the same prompts turn into other tokens (2: a text prompt is tokenised as one string), so that
# a resumed export never keeps shards embedded the old way.
PROMPT_ENCODING = 2


def prompt_digest(prompts: PromptConfig, max_length: int) -> str:
    return _digest(prompts.model_dump(), max_length, PROMPT_ENCODING)


# --- the stage ---------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    output: str
    items: int
    shards: int
    reused_shards: int
    dim: int
    slots: int = 0  # MMEB queries + candidates, of which `items` holds the distinct ones


def shard_name(k: int) -> str:
    return f"shards/shard-{k:05d}"


def _shards(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    shard: list[Item] = []
    for it in items:
        shard.append(it)
        if len(shard) == size:
            yield shard
            shard = []
    if shard:
        yield shard


@dataclass(frozen=True)
class Ranks:
    """This process's place among the export's processes (torchrun), and how they meet."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None
    # The same token on every rank of one attempt: lets rank 0 take the shards the others have just written
    # from a plain folder, whose files have no digest to pin a shard to (a resumed attempt recomputes them).
    attempt: str | None = None


@contextlib.contextmanager
def export_ranks(wait: datetime.timedelta = datetime.timedelta(days=1)) -> Iterator[Ranks]:
    """The export's process group under torchrun: gloo, whatever the device, as it carries only the barrier
    and the attempt token (no tensors). A rank that finishes its shards first waits at the barrier for the
    slowest, hence the long timeout; a rank that fails ends the others through torchrun."""
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=wait)
    try:
        token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(token, src=0)
        yield Ranks(dist.get_rank(), dist.get_world_size(), dist.barrier, token[0])
    finally:
        dist.destroy_process_group()


def export(cfg: CafeConfig, store: Storage, progress: bool = True, ranks: Ranks = Ranks()) -> ExportResult | None:
    """Embed and commit. With several ranks (torchrun) this process embeds the shards k with k % world ==
    rank; after the barrier rank 0 checks and commits every shard and returns the result, the others None."""
    e = cfg.export
    rank, world = ranks.rank, ranks.world
    ref = locate(store, e.checkpoint)
    plan = ExportPlan()
    prompts = prompt_digest(e.prompts, e.max_length)
    out = OutputWriter(store, e.output, kind="embeddings") if rank == 0 else None
    model = builder = device = None
    reused, dim = 0, None
    index: dict[str, list] = {name: [] for name in INDEX_SCHEMA.names}
    counts: dict[str, int] = {}
    others: list[tuple[int, dict]] = []  # the shards another rank embeds: (k, description)
    existing = {o.uri: o.size for o in store.list(join(e.output, "shards"))}  # what an interrupted run left
    k = -1
    for k, shard in enumerate(tqdm(_shards(iter_items(cfg, store, plan), e.shard_size), desc="export", unit="shard",
                                   disable=not progress or rank != 0)):
        for r, it in enumerate(shard):
            for name, value in zip(INDEX_SCHEMA.names, (it.id, it.modality, it.set, k, r)):
                index[name].append(value)
            counts[f"{it.set}/{it.modality}"] = counts.get(f"{it.set}/{it.modality}", 0) + 1
        about = {"ids_sha256": _digest([it.id for it in shard]), "checkpoint_digest": ref.digest,
                 "checkpoint": ref.uri, "prompts": prompts, "rows": len(shard)}
        if ref.digest is None and world > 1:
            about["attempt"] = ranks.attempt
        if k % world != rank:
            others.append((k, about))
            continue
        kept = _reusable(store, e.output, k, about, existing)
        if kept is not None:
            if out is not None:
                for entry in kept:
                    out.add_uploaded(entry)
            reused += 1
            continue
        if model is None:
            model, processor, device = load_for_inference(cfg, store, ref, e.precision)
            builder = InputBuilder(processor, e.prompts, e.max_length)
        emb = embed_items(model, builder, shard, e.batch_size, device)
        dim = emb.shape[1]
        blob = save_safetensors({"embeddings": emb.contiguous()}, metadata={"rows": str(len(shard))})
        desc = json.dumps({**about, "size": len(blob), "sha256": sha256_bytes(blob), "dim": dim, "rank": rank},
                          indent=2).encode()
        # The description is written after the shard: present means the shard before it is complete.
        for name, data in ((f"{shard_name(k)}.safetensors", blob), (f"{shard_name(k)}.json", desc)):
            if out is not None:
                out.put_bytes(name, data)
            else:
                store.write_bytes(join(e.output, name), data)
    if k < 0:
        raise ExportError("nothing to export: eval_sets has no retrieval set and no mmeb folder")
    ranks.barrier()  # every rank's shards are written
    if out is None:
        return None
    existing = {o.uri: o.size for o in store.list(join(e.output, "shards"))}
    for j, about in others:
        kept = _reusable(store, e.output, j, about, existing)
        if kept is None:
            raise ExportError(f"shard {j} of {e.output} (rank {j % world}'s) is missing or not the one this export "
                              "describes; run `cafe export` again (finished shards are kept)")
        for entry in kept:
            out.add_uploaded(entry)
    if dim is None:
        dim = int(store.read_json(join(e.output, f"{shard_name(0)}.json"))["dim"])
    buf = io.BytesIO()
    pq.write_table(pa.table(index, schema=INDEX_SCHEMA), buf)
    out.put_bytes("index.parquet", buf.getvalue())
    slots = sum(d["slots"] for d in plan.mmeb.values())
    # Everything needed to re-embed an item exactly as exported (promotion checks this).
    summary = {"checkpoint": ref.uri, "checkpoint_digest": ref.digest, "items": len(index["id"]), "shards": k + 1,
               "dim": dim, "counts": counts, "prompts_digest": prompts, "prompts": e.prompts.model_dump(),
               "max_length": e.max_length, "precision": e.precision, "eval_sets": cfg.eval_sets.model_dump(),
               "sets": plan.identities,
               "mmeb": {"slots": slots, "items": counts.get("mmeb/interleaved", 0), "datasets": plan.mmeb},
               "world": world}
    out.put_json("export.json", summary)
    out.commit(meta={"items": len(index["id"]), "dim": dim, "checkpoint_digest": ref.digest})
    return ExportResult(e.output, len(index["id"]), k + 1, reused, dim, slots)


def _reusable(store: Storage, output: str, k: int, about: dict, sizes: dict[str, int]) -> list[ManifestEntry] | None:
    """The manifest entries of shard k if an earlier attempt left it complete and it matches `about`
    (`sizes`: the objects under shards/ by URI)."""
    desc_uri = join(output, f"{shard_name(k)}.json")
    if (about["checkpoint_digest"] is None and about.get("attempt") is None) or desc_uri not in sizes:
        return None  # a plain folder has no digest to pin shards to: recompute
    try:
        desc_bytes = store.read_bytes(desc_uri)
        desc = json.loads(desc_bytes)
    except ValueError:
        return None
    if any(desc.get(key) != value for key, value in about.items()):
        return None
    if sizes.get(join(output, f"{shard_name(k)}.safetensors")) != desc.get("size"):
        return None
    return [ManifestEntry(name=f"{shard_name(k)}.safetensors", size=desc["size"], sha256=desc["sha256"]),
            ManifestEntry(name=f"{shard_name(k)}.json", size=len(desc_bytes), sha256=sha256_bytes(desc_bytes))]


# --- reading -----------------------------------------------------------------------------------------


class Embeddings:
    """A committed export: `get(ids)` returns their embeddings [n, dim] in the order asked.

    Shards are read when first needed and kept in a least-recently-used cache of at most ``cache_bytes``
    (at least one shard), so memory is bounded whatever the export's size; readers that go set by set, block
    by block (evaluation) touch each shard a few times."""

    def __init__(self, store: Storage, uri: str, cache_bytes: int = 512 << 20):
        self.store, self.uri, self.cache_bytes = store, uri, cache_bytes
        self.manifest = read_manifest(store, uri)
        self.summary = store.read_json(join(uri, "export.json"))
        self.index = pq.read_table(io.BytesIO(store.read_bytes(join(uri, "index.parquet")))).to_pydict()
        self._pos = {i: n for n, i in enumerate(self.index["id"])}
        self._shard = np.asarray(self.index["shard"], dtype=np.int64)
        self._row = np.asarray(self.index["row"], dtype=np.int64)
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.shard_reads = 0  # how often a shard was read from the store (tests, benchmarks)

    @property
    def checkpoint_digest(self) -> str | None:
        return self.summary.get("checkpoint_digest")

    @property
    def dim(self) -> int:
        return int(self.summary["dim"])

    def has(self, item_id: str) -> bool:
        return item_id in self._pos

    def _load(self, k: int) -> torch.Tensor:
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        shard = load_safetensors(self.store.read_bytes(join(self.uri, f"{shard_name(k)}.safetensors")))["embeddings"]
        self.shard_reads += 1
        self._cache[k] = shard
        while len(self._cache) > 1 and sum(t.nbytes for t in self._cache.values()) > self.cache_bytes:
            self._cache.popitem(last=False)
        return shard

    def get(self, ids: Sequence[str]) -> torch.Tensor:
        missing = [i for i in ids if i not in self._pos]
        if missing:
            raise ExportError(f"{self.uri} has no embedding for {missing[0]!r} (and {len(missing) - 1} more): "
                              "the export is from other evaluation sets; run `cafe export` again")
        pos = np.fromiter((self._pos[i] for i in ids), dtype=np.int64, count=len(ids))
        out = torch.empty(len(ids), self.dim)
        shards = self._shard[pos]
        for k in dict.fromkeys(shards.tolist()):  # in order of first use
            sel = np.nonzero(shards == k)[0]
            out[torch.from_numpy(sel)] = self._load(k)[torch.from_numpy(self._row[pos[sel]])]
        return out

    def rows(self, ids: Sequence[str]) -> "EmbeddingRows":
        """A lazy view of these items' embeddings, read block by block (`retrieval.retrieval_ranks`)."""
        return EmbeddingRows(self, list(ids))

    def check_set(self, key: str, identity: dict) -> None:
        """Refuse to pair these embeddings with a set whose items differ from the ones exported."""
        recorded = self.summary.get("sets")
        if not isinstance(recorded, dict):
            raise ExportError(f"{self.uri} records no evaluation-set identities (exported by an older version): run "
                              "`cafe export` again")
        found = differences({key: identity}, recorded)
        if found:
            raise ExportError(f"{self.uri} was exported from other items than evaluate scores: {found[0]}; run "
                              "`cafe export` again with the same eval_sets")

    def ids(self, prefix: str) -> Iterator[str]:
        return (i for i in self.index["id"] if i.startswith(prefix))


class EmbeddingRows:
    """Rows of an export in a given order: ``len()`` and slices, each slice read when asked for."""

    def __init__(self, emb: Embeddings, ids: list[str]):
        missing = [i for i in ids if not emb.has(i)]
        if missing:
            emb.get(missing[:1])  # raises with the export's message
        self.emb, self.ids = emb, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        if not isinstance(rows, slice):
            raise TypeError("EmbeddingRows takes slices: rows are read block by block")
        return self.emb.get(self.ids[rows])
