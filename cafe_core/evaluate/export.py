"""`cafe export`: embed every evaluation item once; evaluation reads these files instead of re-encoding.

Output (one committed output, `_MANIFEST.json`):
- `shards/shard-NNNNN.safetensors`: tensor `embeddings` [n, dim] float32, L2-normalised, rows in index order;
- `shards/shard-NNNNN.json`: what the shard holds (item-id digest, checkpoint digest, prompt digest), so an
  interrupted export resumes by shard: a shard whose description matches is kept, not recomputed;
- `index.parquet`: id, modality (image | text | interleaved), set, shard, row;
- `export.json`: checkpoint, its digest, counts per set and modality, dimension.

Item ids are stable: `retrieval/<set>/image/<i>`, `retrieval/<set>/text/<j>` (the j-th caption, flattened in
file order), `mmeb/<dataset>/query/<row>`, `mmeb/<dataset>/candidate/<row>/<k>` (k = 0 is the positive).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Iterator, Sequence

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
from cafe_core.evaluate.identity import differences, set_identity
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


def mmeb_items(ds) -> list[Item]:
    name = f"mmeb/{ds.name}"
    out = []
    for r, row in enumerate(ds.rows):
        out.append(Item(f"{name}/query/{r}", "interleaved", name, text=row.qry_text, image=row.qry_image))
        out += [Item(f"{name}/candidate/{r}/{k}", "interleaved", name, text=t, image=img)
                for k, (t, img) in enumerate(row.candidates)]
    return out


def collect_items(cfg: CafeConfig, store: Storage, identities: dict[str, dict] | None = None) -> list[Item]:
    """Every item of the configured embedding sets (retrieval and MMEB), in a stable order; each set's
    identity (`identity.set_identity`) goes into ``identities`` when given."""
    s = cfg.eval_sets
    identities = {} if identities is None else identities
    items: list[Item] = []
    for name, uri in s.retrieval.items():
        rs = eval_sets.load_retrieval(store, uri, name, s.max_items)
        identities[f"retrieval/{name}"] = retrieval_identity(rs, uri, s.max_items)
        items += retrieval_items(rs)
    if s.mmeb:
        for ds in eval_sets.load_mmeb(store, s.mmeb, s.max_items):
            identities[f"mmeb/{ds.name}"] = set_identity(ds, len(ds.rows), s.mmeb, s.max_items)
            items += mmeb_items(ds)
    if not items:
        raise ExportError("nothing to export: eval_sets has no retrieval set and no mmeb folder")
    ids = [i.id for i in items]
    if len(set(ids)) != len(ids):
        raise ExportError("duplicate item ids: two evaluation sets share a name; rename one in eval_sets")
    return items


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
    """(CafeModel in eval mode on the device, processor, device). bf16 on a GPU unless told otherwise."""
    from cafe_core.model.build import build  # transformers: only the tasks that load a model pay for it

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
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


def shard_name(k: int) -> str:
    return f"shards/shard-{k:05d}"


def export(cfg: CafeConfig, store: Storage, progress: bool = True) -> ExportResult:
    e = cfg.export
    ref = locate(store, e.checkpoint)
    identities: dict[str, dict] = {}
    items = collect_items(cfg, store, identities)
    shards = [items[i:i + e.shard_size] for i in range(0, len(items), e.shard_size)]
    prompts = prompt_digest(e.prompts, e.max_length)
    out = OutputWriter(store, e.output, kind="embeddings")
    model = builder = device = None
    reused, dim = 0, None
    existing = {o.uri: o.size for o in store.list(join(e.output, "shards"))}  # what an interrupted run left
    for k, shard in enumerate(tqdm(shards, desc="export", unit="shard", disable=not progress)):
        about = {"ids_sha256": _digest([it.id for it in shard]), "checkpoint_digest": ref.digest,
                 "checkpoint": ref.uri, "prompts": prompts, "rows": len(shard)}
        kept = _reusable(store, e.output, k, about, existing)
        if kept is not None:
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
        out.put_bytes(f"{shard_name(k)}.safetensors", blob)
        # The description is written after the shard: present means the shard before it is complete.
        out.put_json(f"{shard_name(k)}.json", {**about, "size": len(blob), "sha256": sha256_bytes(blob), "dim": dim})
    if dim is None:
        dim = int(store.read_json(join(e.output, f"{shard_name(0)}.json"))["dim"])
    index = pa.table({
        "id": [it.id for it in items], "modality": [it.modality for it in items], "set": [it.set for it in items],
        "shard": [k for k, shard in enumerate(shards) for _ in shard],
        "row": [r for shard in shards for r in range(len(shard))],
    }, schema=INDEX_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(index, buf)
    out.put_bytes("index.parquet", buf.getvalue())
    counts: dict[str, int] = {}
    for it in items:
        key = f"{it.set}/{it.modality}"
        counts[key] = counts.get(key, 0) + 1
    # Everything needed to re-embed an item exactly as exported (promotion checks this).
    summary = {"checkpoint": ref.uri, "checkpoint_digest": ref.digest, "items": len(items), "shards": len(shards),
               "dim": dim, "counts": counts, "prompts_digest": prompts, "prompts": e.prompts.model_dump(),
               "max_length": e.max_length, "precision": e.precision, "eval_sets": cfg.eval_sets.model_dump(),
               "sets": identities}
    out.put_json("export.json", summary)
    out.commit(meta={"items": len(items), "dim": dim, "checkpoint_digest": ref.digest})
    return ExportResult(e.output, len(items), len(shards), reused, dim)


def _reusable(store: Storage, output: str, k: int, about: dict, sizes: dict[str, int]) -> list[ManifestEntry] | None:
    """The manifest entries of shard k if an earlier attempt left it complete and it matches `about`
    (`sizes`: the objects under shards/ by URI)."""
    desc_uri = join(output, f"{shard_name(k)}.json")
    if about["checkpoint_digest"] is None or desc_uri not in sizes:
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
    """A committed export: `get(ids)` returns their embeddings [n, dim] in the order asked."""

    def __init__(self, store: Storage, uri: str):
        self.uri = uri
        self.manifest = read_manifest(store, uri)
        self.summary = store.read_json(join(uri, "export.json"))
        self.index = pq.read_table(io.BytesIO(store.read_bytes(join(uri, "index.parquet")))).to_pydict()
        self._pos = {i: n for n, i in enumerate(self.index["id"])}
        by_shard: dict[int, torch.Tensor] = {}
        for k in sorted(set(self.index["shard"])):
            by_shard[k] = load_safetensors(store.read_bytes(join(uri, f"{shard_name(k)}.safetensors")))["embeddings"]
        self.matrix = torch.cat([by_shard[k] for k in sorted(by_shard)]) if by_shard else torch.zeros(0, 0)

    @property
    def checkpoint_digest(self) -> str | None:
        return self.summary.get("checkpoint_digest")

    def has(self, item_id: str) -> bool:
        return item_id in self._pos

    def get(self, ids: Sequence[str]) -> torch.Tensor:
        missing = [i for i in ids if i not in self._pos]
        if missing:
            raise ExportError(f"{self.uri} has no embedding for {missing[0]!r} (and {len(missing) - 1} more): "
                              "the export is from other evaluation sets; run `cafe export` again")
        return self.matrix[torch.tensor([self._pos[i] for i in ids], dtype=torch.long)]

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
