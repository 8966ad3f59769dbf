"""The promotion gate: the hand-computed truth table of `evaluate_rules`, and `decide` failing closed on real
files (a local folder, and the real S3 server)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cafe_core.commit import MANIFEST, OutputWriter, manifest_digest, read_manifest
from cafe_core.config import CafeConfig, GateConfig, GateRule, load_config
from cafe_core.evaluate.directions import UnknownDirection, direction_of
from cafe_core.gate import decide, evaluate_rules, load_rules, sets_behind, write_decision
from cafe_core.records import ChampionInfo, ChampionUnreadable, Decision, read_decision
from cafe_core.registry import champion_metrics
from cafe_core.storage import NotCommittedError, Storage
from cafe_core.uris import join

# --- helpers (test_registry.py uses them too) --------------------------------------------------------

GOOD = {
    "retrieval/shapes/i2t_R@1": 0.42,
    "retrieval/shapes/t2i_R@1": 0.40,
    "retrieval/shapes/i2t_R@5": 0.80,
    "pope/random/f1": 0.70,
    "pope/popular/f1": 0.68,
    "pope/random/accuracy": 0.70,
    "pope/popular/accuracy": 0.66,
    "pope/random/yes_ratio": 0.5,
    "pope/popular/yes_ratio": 0.5,
    "caption/classwise/f0.5": 0.5,
    "mmeb/overall/p@1": 0.3,
    "gap/centroid_distance": 0.8,
}
# An evaluation writes the strict variants beside the headline numbers (equal where nothing ties).
GOOD.update({f"{k}_strict": v for k, v in GOOD.items() if k.startswith(("retrieval/", "mmeb/"))})
# What GOOD was scored on (evaluate.identity.set_identity per set), as metrics.json records it.
SETS = {key: {"digest": f"sha-of-{key}", "items": 10, "uri": f"s3://sets/{key}", "max_items": None}
        for key in ("retrieval/shapes", "pope/random", "pope/popular", "caption", "mmeb/ShapesI2T", "mc/mmstar")}
RULES = [
    GateRule(metric="retrieval/*/i2t_R@1", min=0.10),
    GateRule(metric="pope/*/f1", min=0.5, max_drop=0.05),
    GateRule(metric="pope/*/yes_ratio", min=0.2, max=0.8),
]


def make_model(store: Storage, uri: str, weights: bytes = b"weights-1") -> str:
    """A committed `cafe train`-style output (model/ inside); returns its checkpoint digest."""
    out = OutputWriter(store, uri, kind="trained-model")
    out.put_json("model/config.json", {"model_type": "llava_onevision"})
    out.put_bytes("model/model.safetensors", weights * 100)
    out.put_text("config.yaml", "run_id: x\n")
    out.commit()
    return manifest_digest(store, uri)


def make_metrics(store: Storage, prefix: str, *, run_id: str, digest: str | None, metrics: dict, checkpoint: str = "",
                 sets: dict | None = SETS) -> str:
    """A committed `cafe evaluate` output holding metrics.json (NaN written as json.dumps writes it)."""
    out = OutputWriter(store, prefix, kind="evaluation")
    body = {"run_id": run_id, "checkpoint": checkpoint, "checkpoint_digest": digest,
            "created": "2026-11-22T10:00:00+00:00", "code_version": "git:test", "config_digest": "c0ffee",
            "metrics": metrics, **({} if sets is None else {"sets": sets})}
    uri = out.put_bytes("metrics.json", json.dumps(body, indent=2).encode())
    out.commit()
    return uri


def make_cfg(root: str, run_id: str = "r1", rules: list[GateRule] | None = None) -> CafeConfig:
    cfg = load_config(None, [f"root={root}", f"run_id={run_id}"])
    cfg.gate.rules = list(RULES if rules is None else rules)
    return cfg


def make_candidate(store: Storage, root: str, run_id: str, metrics: dict | None = None,
                   weights: bytes | None = None, rules: list[GateRule] | None = None) -> CafeConfig:
    """A trained model and its evaluation for one run, as the real stages lay them out."""
    cfg = make_cfg(root, run_id, rules)
    digest = make_model(store, cfg.gate.checkpoint, weights or f"weights-{run_id}".encode())
    make_metrics(store, cfg.gate.metrics, run_id=run_id, digest=digest,
                 metrics=dict(GOOD if metrics is None else metrics), checkpoint=cfg.gate.checkpoint)
    return cfg


def gate_run(store: Storage, root: str, run_id: str, metrics: dict | None = None,
             **kw) -> tuple[CafeConfig, Decision, str]:
    """make_candidate, then decide (against the registry's champion, as cafe gate does) and write the
    decision: (cfg, decision, decision.json URI)."""
    cfg = make_candidate(store, root, run_id, metrics, **kw)
    decision = decide(cfg, store, champion_metrics(cfg, store))
    return cfg, decision, write_decision(store, cfg, decision)


# --- the truth table (pure) --------------------------------------------------------------------------


def one(rule: GateRule, metrics: dict, champion: dict | None = None):
    (v,) = evaluate_rules([rule], metrics, champion)
    return v


def test_pass_within_absolute_bounds():
    v = one(GateRule(metric="pope/random/yes_ratio", min=0.2, max=0.8), {"pope/random/yes_ratio": 0.5})
    assert v.passed and v.verdict == "PASS" and v.value == 0.5 and v.min == 0.2 and v.max == 0.8
    assert v.reason == "0.5 >= min 0.2; 0.5 <= max 0.8"


@pytest.mark.parametrize("value,passed", [(0.09, False), (0.10, True), (0.11, True)])
def test_min(value, passed):
    v = one(GateRule(metric="m", min=0.10), {"m": value})
    assert v.passed is passed
    if not passed:
        assert v.reason == "0.09 < min 0.1"


@pytest.mark.parametrize("value,passed", [(0.81, False), (0.80, True), (0.2, True)])
def test_max(value, passed):
    v = one(GateRule(metric="m", max=0.80), {"m": value})
    assert v.passed is passed
    if not passed:
        assert "> max 0.8" in v.reason


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "0.5", None, True, [0.5]])
def test_non_numbers_fail(bad):
    v = one(GateRule(metric="m", max=1.0), {"m": bad})
    assert not v.passed and v.value is None
    assert ("NaN" if isinstance(bad, float) and math.isnan(bad) else "not a finite number") in v.reason


def test_missing_metric_fails():
    v = one(GateRule(metric="mmeb/overall/p@1", min=0.2), {"other": 1.0})
    assert not v.passed and v.metric == "mmeb/overall/p@1" and v.reason.startswith("missing: the metric is missing")


def test_glob_matching_nothing_fails():
    v = one(GateRule(metric="retrieval/*/i2t_R@1", min=0.1), {"pope/random/f1": 0.7})
    assert not v.passed and v.metric == "retrieval/*/i2t_R@1" and "no metric matches" in v.reason


def test_glob_checks_each_slice_on_its_own():
    metrics = {"retrieval/coco/i2t_R@1": 0.30, "retrieval/flickr/i2t_R@1": 0.05, "retrieval/coco/t2i_R@1": 0.0}
    vs = evaluate_rules([GateRule(metric="retrieval/*/i2t_R@1", min=0.10)], metrics, None)
    assert [(v.metric, v.passed) for v in vs] == [("retrieval/coco/i2t_R@1", True), ("retrieval/flickr/i2t_R@1", False)]
    assert all(v.rule == "retrieval/*/i2t_R@1" for v in vs)


# champion 0.70, max_drop 0.05: a drop of exactly 0.05 is allowed, 0.06 is not, a gain always passes.
@pytest.mark.parametrize("value,passed,delta", [(0.66, True, -0.04), (0.65, True, -0.05), (0.64, False, -0.06),
                                                (0.90, True, 0.20)])
def test_max_drop_higher_is_better(value, passed, delta):
    v = one(GateRule(metric="pope/random/f1", max_drop=0.05), {"pope/random/f1": value}, {"pope/random/f1": 0.70})
    assert v.passed is passed and v.champion == 0.70 and v.delta == pytest.approx(delta)
    if not passed:
        assert "drop +0.06 vs champion 0.7 > max_drop 0.05" == v.reason


# lower is better (a distance): champion 0.80, max_drop 0.05: 0.85 passes, 0.86 fails, 0.10 is a gain.
@pytest.mark.parametrize("value,passed", [(0.84, True), (0.85, True), (0.86, False), (0.10, True)])
def test_max_drop_lower_is_better(value, passed):
    rule = GateRule(metric="gap/centroid_distance", direction="lower", max_drop=0.05)
    v = one(rule, {"gap/centroid_distance": value}, {"gap/centroid_distance": 0.80})
    assert v.passed is passed and v.delta == pytest.approx(value - 0.80)


# champion 0.50, 10%: allowed drop 0.05 (either direction of "better").
@pytest.mark.parametrize("direction,value,passed", [
    ("higher", 0.46, True), ("higher", 0.45, True), ("higher", 0.44, False), ("higher", 0.60, True),
    ("lower", 0.54, True), ("lower", 0.55, True), ("lower", 0.56, False), ("lower", 0.40, True),
])
def test_max_drop_relative(direction, value, passed):
    rule = GateRule(metric="m", direction=direction, max_drop_relative=0.10)
    v = one(rule, {"m": value}, {"m": 0.50})
    assert v.passed is passed, v.reason
    if not passed:
        assert "> 10% of it (0.05)" in v.reason


def test_direction_comes_from_the_metric_table():
    # The modality gap is lower-is-better without the rule saying so: a rise of 0.06 is a drop of 0.06.
    rule = GateRule(metric="gap/shapes/centroid_distance", max_drop=0.05)
    assert rule.direction == "lower"
    v = one(rule, {"gap/shapes/centroid_distance": 0.46}, {"gap/shapes/centroid_distance": 0.40})
    assert not v.passed and "drop +0.06" in v.reason
    assert GateRule(metric="retrieval/*/t2i_R@5", max_drop=0.01).direction == "higher"
    assert GateRule(metric="mc/mmstar/coarse_perception/accuracy", min=0.3).direction == "higher"
    assert GateRule(metric="pope/*/yes_ratio", min=0.4, max=0.6).direction is None  # a band: no better side


def test_every_metric_an_evaluation_writes_has_a_known_direction():
    # A real evaluation's output (the committed base's card: pope, mc, caption, retrieval, gap) and MMEB's names.
    names = json.loads((Path(__file__).parents[1] / "models/shapes-base/metrics.json").read_text())["metrics"]
    names = [*names, "mmeb/overall/p@1", "mmeb/classification/p@1", "mmeb/dataset/ShapesI2T/p@1", "mmeb/overall/p@1_strict"]
    assert len(names) > 100
    unknown = []
    for name in names:
        try:
            direction_of(name)
        except UnknownDirection:
            unknown.append(name)
    assert not unknown, f"add these to cafe_core/evaluate/directions.py: {unknown}"


@pytest.mark.parametrize("rule, message", [
    (dict(metric="gap/centroid_distance", direction="higher", max_drop=0.05), "lower is better for this metric"),
    (dict(metric="pope/*/yes_ratio", max_drop=0.05), "no better side"),
    (dict(metric="pope/*/yes_ratio", direction="lower", max=0.7), "it has no better side"),
    (dict(metric="pope/*", max_drop=0.05), "not known for this name; state direction"),  # the glob covers both
    (dict(metric="my/custom_loss", max_drop_relative=0.1), "not known for this name; state direction"),
])
def test_rules_without_a_known_direction_are_refused(rule, message):
    with pytest.raises(ValueError, match=message):
        GateRule(**rule)


def test_a_stated_direction_serves_names_the_table_does_not_know():
    assert GateRule(metric="my/custom_loss", direction="lower", max_drop=0.1).direction == "lower"
    assert GateRule(metric="my/custom_score", min=0.5).direction is None  # absolute bounds need no direction


@pytest.mark.parametrize("name, behind", [
    ("retrieval/shapes/i2t_R@1_strict", ["retrieval/shapes"]),
    ("gap/shapes/centroid_distance", ["retrieval/shapes"]), ("gap/centroid_distance", ["retrieval/shapes"]),
    ("pope/random/f1", ["pope/random"]), ("pope/average/f1", ["pope/popular", "pope/random"]),
    ("mmeb/dataset/ShapesI2T/p@1", ["mmeb/ShapesI2T"]), ("mmeb/overall/p@1_strict", ["mmeb/ShapesI2T"]),
    ("mc/mmstar/coarse_perception/accuracy", ["mc/mmstar"]), ("caption/classwise/f0.5", ["caption"]),
    ("my/custom", []),
])
def test_sets_behind_a_metric(name, behind):
    assert sets_behind(name, SETS) == behind


def test_drop_checks_need_the_champion_scored_on_the_same_items():
    rule = GateRule(metric="pope/*/f1", min=0.5, max_drop=0.05)
    ok = evaluate_rules([rule], GOOD, GOOD, SETS, SETS)
    assert all(v.passed for v in ok) and all("vs champion" in v.reason for v in ok)
    # The champion's random split had other questions (say max_items cut it): that slice fails, naming the set.
    other = {**SETS, "pope/random": {**SETS["pope/random"], "digest": "sha-of-fewer", "items": 4, "max_items": 4}}
    popular, random = evaluate_rules([rule], GOOD, GOOD, SETS, other)  # slices in name order
    assert not random.passed and random.champion is None and "scored on other items than the champion: " \
        "pope/random: 10 items" in random.reason and "vs 4 items" in random.reason and "allow_other_sets" in random.reason
    assert popular.passed
    # Absolute bounds need no champion, so no comparable one either.
    assert all(v.passed for v in evaluate_rules([GateRule(metric="pope/*/f1", min=0.5)], GOOD, GOOD, SETS, other))
    # A champion evaluated before sets were recorded: every drop check fails closed.
    old = evaluate_rules([rule], GOOD, GOOD, SETS, None)
    assert not any(v.passed for v in old) and all("record no evaluation-set identities" in v.reason for v in old)
    # Unless the rule says to compare anyway; the reason keeps the difference.
    lax = GateRule(metric="pope/*/f1", min=0.5, max_drop=0.05, allow_other_sets=True)
    _, random = evaluate_rules([lax], GOOD, GOOD, SETS, other)
    assert random.passed and "compared although scored on other items" in random.reason
    # A candidate metric with no set behind it cannot be vouched for.
    (custom,) = evaluate_rules([GateRule(metric="my/custom", direction="higher", max_drop=0.1)],
                               {"my/custom": 1.0}, {"my/custom": 1.0}, SETS, SETS)
    assert not custom.passed and "no record of which evaluation items my/custom" in custom.reason


def test_gate_fails_a_candidate_scored_on_other_items_than_the_champion(tmp_path):
    store, root = Storage(), str(tmp_path)
    cfg = make_candidate(store, root, "r1")
    champ = ChampionInfo(version="v7", model_uri="s3://reg/cafe/versions/v7/checkpoint", metrics=dict(GOOD),
                         checkpoint_digest="d" * 64, decision_uri="s3://reg/cafe/versions/v7/decision.json",
                         sets={**SETS, "pope/popular": {**SETS["pope/popular"], "digest": "sha-of-v2-release"}})
    d = decide(cfg, store, champ)
    assert d.decision == "FAIL" and d.reasons == ["1 of 5 checks failed: pope/popular/f1"]
    assert "pope/popular: 10 items" in next(v.reason for v in d.verdicts if not v.passed)


def test_champion_lacking_the_metric_fails():
    v = one(GateRule(metric="pope/random/f1", min=0.5, max_drop=0.05), {"pope/random/f1": 0.7}, {"other": 1.0})
    assert not v.passed and "champion has no 'pope/random/f1'" in v.reason


def test_champion_nan_fails():
    v = one(GateRule(metric="pope/random/f1", max_drop_relative=0.1), {"pope/random/f1": 0.7},
            {"pope/random/f1": float("nan")})
    assert not v.passed and "not a finite number: cannot compare" in v.reason


def test_no_champion_skips_drop_checks_but_not_absolute_bounds():
    rule = GateRule(metric="pope/random/f1", min=0.5, max_drop=0.05, max_drop_relative=0.1)
    ok = one(rule, {"pope/random/f1": 0.7}, None)
    assert ok.passed and "drop checks skipped" in ok.reason and ok.champion is None and ok.delta is None
    low = one(rule, {"pope/random/f1": 0.4}, None)
    assert not low.passed and low.reason == "0.4 < min 0.5"


def test_production_rules_file_is_valid_and_stricter():
    rules = load_rules(Storage(), "configs/gate-production.yaml")
    tiny_like = {**GOOD, "pope/random/yes_ratio": 0.99, "retrieval/flickr30k/i2t_R@1_strict": 0.36,
                 "retrieval/flickr30k/t2i_R@1_strict": 0.28, "mc/mmstar/accuracy": 0.2}
    failed = {v.metric for v in evaluate_rules(rules, tiny_like, None) if not v.passed}
    assert {"retrieval/flickr30k/i2t_R@1_strict", "pope/random/yes_ratio", "caption/classwise/f0.5"} <= failed


def test_rules_file_errors_name_the_rule(tmp_path):
    bad = tmp_path / "rules.yaml"
    bad.write_text("rules:\n  - metric: pope/*/f1\n    min: 0.5\n  - metric: retrieval/*/i2t_R@1\n")
    with pytest.raises(ValueError, match=r"rules\[1\] \(retrieval/\*/i2t_R@1\).*no bound"):
        load_rules(Storage(), str(bad))
    bad.write_text("gate: {}\n")
    with pytest.raises(ValueError, match="rules:"):
        load_rules(Storage(), str(bad))


def test_shipped_gate_yaml_is_valid_and_judges():
    rules = load_rules(Storage(), str(Path(__file__).parents[1] / "configs" / "gate.yaml"))
    gate = GateConfig(rules=rules)
    assert len(gate.rules) >= 7
    # A model like the default run's CAFe model: it retrieves and still answers.
    good = {**GOOD, **{f"pope/{s}/{m}": v for s in ("random", "popular", "adversarial")
                       for m, v in (("accuracy", 0.80), ("f1", 0.80), ("yes_ratio", 0.55))},
            "mc/mmstar/accuracy": 0.54, "caption/classwise/f0.5": 0.25}
    champion = dict(good)
    assert all(v.passed for v in evaluate_rules(gate.rules, good, champion)), "the sample metrics should pass"
    worse = {**good, "retrieval/shapes/t2i_R@1_strict": 0.35}  # 12.5% below the champion's 0.40
    failed = [v.metric for v in evaluate_rules(gate.rules, worse, champion) if not v.passed]
    assert failed == ["retrieval/shapes/t2i_R@1_strict"]
    # Embeddings that tie (a collapsing model): index order still finds the right caption first, the strict
    # variant does not, and the gate bounds the strict one.
    tied = {**good, "retrieval/shapes/i2t_R@1": 0.50, "retrieval/shapes/i2t_R@1_strict": 0.0}
    assert [v.metric for v in evaluate_rules(gate.rules, tied, None) if not v.passed] == ["retrieval/shapes/i2t_R@1_strict"]
    # Absolute bounds, with no champion: a yes-sayer and a model that lost its understanding fail.
    yes_sayer = {**good, "pope/adversarial/yes_ratio": 0.75}
    assert [v.metric for v in evaluate_rules(gate.rules, yes_sayer, None) if not v.passed] == ["pope/adversarial/yes_ratio"]
    lost = {**good, "mc/mmstar/accuracy": 0.27, "caption/classwise/f0.5": 0.03, "pope/adversarial/accuracy": 0.61}
    assert sorted(v.metric for v in evaluate_rules(gate.rules, lost, None) if not v.passed) == [
        "caption/classwise/f0.5", "mc/mmstar/accuracy", "pope/adversarial/accuracy"]


# --- decide(): fails closed, on real files -----------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> tuple[Storage, str]:
    if request.param == "local":
        return Storage(), str(tmp_path / "cafe")
    request.getfixturevalue("s3_env")
    return Storage(multipart_threshold_mb=5, multipart_chunk_mb=5), request.getfixturevalue("bucket")


def test_pass_is_recorded_with_everything(where):
    store, root = where
    cfg, decision, uri = gate_run(store, root, "r1")
    assert decision.decision == "PASS" and decision.reasons == [] and decision.champion is None
    assert decision.checkpoint_digest == manifest_digest(store, cfg.gate.checkpoint)
    assert decision.run_id == "r1" and decision.config_digest == cfg.digest() and decision.code_version
    assert decision.inputs.registry == join(cfg.registry.uri, cfg.registry.model_name)
    assert len(decision.verdicts) == 5 and all(v.passed for v in decision.verdicts)
    assert uri == join(cfg.gate.output, "decision.json")
    assert read_manifest(store, cfg.gate.output).kind == "gate-decision"
    record = json.loads(store.read_bytes(uri))
    assert {"decision", "reasons", "verdicts", "champion", "inputs", "checkpoint_digest", "run_id", "code_version",
            "config_digest", "rules", "time"} <= set(record)
    assert {"metric", "value", "min", "max", "max_drop", "delta", "verdict", "reason"} <= set(record["verdicts"][0])
    assert read_decision(store, uri) == decision
    why = store.read_text(join(cfg.gate.output, "why.md"))
    assert why.splitlines()[0].startswith("PASS: run r1, 5/5 checks passed") and "| `pope/random/f1` |" in why


def test_uncommitted_metrics_fail(tmp_path):
    store, root = Storage(), str(tmp_path)
    cfg = make_candidate(store, root, "r1")
    store.delete(join(cfg.gate.metrics, MANIFEST))  # the evaluation never finished
    d = decide(cfg, store, None)
    assert d.decision == "FAIL" and d.verdicts == []
    assert "not a committed output" in d.reasons[0]
    write_decision(store, cfg, d)  # a FAIL is written like a PASS
    assert read_decision(store, join(cfg.gate.output, "decision.json")).decision == "FAIL"
    assert store.read_text(join(cfg.gate.output, "why.md")).startswith("FAIL")


def test_metrics_of_another_run_fail(where):
    store, root = where
    cfg = make_candidate(store, root, "r1")
    digest = manifest_digest(store, cfg.gate.checkpoint)
    make_metrics(store, cfg.gate.metrics, run_id="r0", digest=digest, metrics=GOOD)
    d = decide(cfg, store, None)
    assert d.decision == "FAIL" and any("run_id is 'r0', not this run's 'r1'" in r for r in d.reasons)


def test_stale_metrics_fail(tmp_path):
    """The checkpoint was re-trained after evaluation: its manifest digest no longer matches."""
    store, root = Storage(), str(tmp_path)
    cfg = make_candidate(store, root, "r1")
    make_model(store, cfg.gate.checkpoint, b"retrained")
    d = decide(cfg, store, None)
    assert d.decision == "FAIL" and any(r.startswith("stale metrics") for r in d.reasons)
    assert all(v.passed for v in d.verdicts), "the values themselves were fine: only staleness fails"


def test_missing_checkpoint_fails(tmp_path):
    store, root = Storage(), str(tmp_path)
    cfg = make_candidate(store, root, "r1")
    store.delete(join(cfg.gate.checkpoint, MANIFEST))
    d = decide(cfg, store, None)
    assert d.decision == "FAIL" and d.checkpoint_digest is None
    assert any("checkpoint" in r and "not a committed output" in r for r in d.reasons)


def test_tampered_or_foreign_metrics_fail(tmp_path):
    store, root = Storage(), str(tmp_path)
    cfg = make_candidate(store, root, "r1")
    uri = join(cfg.gate.metrics, "metrics.json")
    body = json.loads(store.read_bytes(uri))
    body["metrics"]["pope/random/f1"] = 0.99
    store.write_bytes(uri, json.dumps(body).encode())
    assert any("does not match its manifest" in r for r in decide(cfg, store, None).reasons)
    out = OutputWriter(store, cfg.gate.metrics, kind="pairs")  # a committed output of the wrong stage
    out.put_bytes("metrics.json", b"{}")
    out.commit()
    assert any("is a 'pairs' output, not an 'evaluation' one" in r for r in decide(cfg, store, None).reasons)


def test_nan_and_missing_metrics_fail(tmp_path):
    store, root = Storage(), str(tmp_path)
    metrics = {**GOOD, "pope/popular/f1": float("nan")}
    del metrics["retrieval/shapes/i2t_R@1"]
    metrics["gap/centroid_distance"] = float("nan")  # unchecked by any rule: still a broken evaluation
    cfg = make_candidate(store, root, "r1", metrics)
    d = decide(cfg, store, None)
    assert d.decision == "FAIL"
    failed = sorted(v.metric for v in d.verdicts if not v.passed)
    assert failed == ["pope/popular/f1", "retrieval/*/i2t_R@1"]
    assert any("non-finite or non-numeric values for gap/centroid_distance, pope/popular/f1" in r for r in d.reasons)
    record = json.loads(Decision.model_dump_json(d))  # the record stays valid JSON
    assert record["decision"] == "FAIL"


def test_metrics_of_an_unpinned_checkpoint_fail(tmp_path):
    store, root = Storage(), str(tmp_path)
    cfg = make_candidate(store, root, "r1")
    make_metrics(store, cfg.gate.metrics, run_id="r1", digest=None, metrics=GOOD, checkpoint="/some/hf/folder")
    d = decide(cfg, store, None)
    assert d.decision == "FAIL" and any("has no manifest digest" in r for r in d.reasons)


def test_no_rules_is_not_a_pass(tmp_path):
    store, root = Storage(), str(tmp_path)
    cfg = make_candidate(store, root, "r1", rules=[])
    d = decide(cfg, store, None)
    assert d.decision == "FAIL" and d.verdicts == [] and "nothing checked is not a pass" in d.reasons[0]


def test_unreadable_champion_fails(where):
    store, root = where
    cfg = make_candidate(store, root, "r1")
    aliases = join(cfg.registry.uri, cfg.registry.model_name, "aliases.json")
    store.write_json(aliases, {"champion": "v1", "previous": None, "history": []})  # v1 was never committed
    d = decide(cfg, store, champion_metrics(cfg, store))
    assert d.decision == "FAIL" and any(r.startswith("champion unreadable") for r in d.reasons)
    # the drop checks could not be made, so they do not pass as "no champion" would
    assert [v.passed for v in d.verdicts if v.max_drop is not None] == [False, False]
    store.write_bytes(aliases, b"{not json")
    d = decide(cfg, store, champion_metrics(cfg, store))
    assert d.decision == "FAIL" and any("is corrupt" in r for r in d.reasons)


def test_champion_is_the_callers_argument(tmp_path):
    """decide() judges against the champion it is given (nothing in the registry is read), and fails closed
    on a champion the registry could not read, exactly as when it read the registry itself."""
    store, root = Storage(), str(tmp_path)
    cfg = make_candidate(store, root, "r1", {**GOOD, "pope/random/f1": 0.60})
    champ = ChampionInfo(version="v7", model_uri="s3://reg/cafe/versions/v7/checkpoint", metrics=dict(GOOD),
                         checkpoint_digest="d" * 64, decision_uri="s3://reg/cafe/versions/v7/decision.json", sets=SETS)
    d = decide(cfg, store, champ)
    assert d.decision == "FAIL" and d.champion.version == "v7" and d.champion.model_uri == champ.model_uri
    (bad,) = [v for v in d.verdicts if not v.passed]
    assert (bad.metric, bad.champion) == ("pope/random/f1", 0.70)
    assert d.reasons == ["1 of 5 checks failed: pope/random/f1"]
    assert decide(cfg, store, None).decision == "PASS"  # no champion: the drop checks are skipped

    d = decide(cfg, store, ChampionUnreadable("registry aliases s3://reg/cafe/aliases.json unreadable: boom"))
    assert d.decision == "FAIL" and d.champion is None
    assert d.reasons[0] == ("champion unreadable: registry aliases s3://reg/cafe/aliases.json unreadable: boom; "
                            "repair the registry or roll back before gating")
    drops = [v for v in d.verdicts if v.max_drop is not None]
    assert drops and all(not v.passed and v.reason.startswith("champion unreadable, drop checks impossible")
                         for v in drops)
    assert all(v.passed for v in d.verdicts if v.max_drop is None)  # the absolute bounds are unaffected
    with pytest.raises(TypeError, match="ChampionInfo, ChampionUnreadable or None"):
        decide(cfg, store, {"pope/random/f1": 0.7})  # type: ignore[arg-type]

def test_checkpoint_digest_is_the_manifest_hash(tmp_path):
    store = Storage()
    uri = str(tmp_path / "m")
    digest = make_model(store, uri)
    import hashlib

    assert digest == hashlib.sha256((tmp_path / "m" / MANIFEST).read_bytes()).hexdigest()
    with pytest.raises(NotCommittedError):
        manifest_digest(store, str(tmp_path / "nothing"))
