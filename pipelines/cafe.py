"""The CAFe pipeline: convert -> validate -> train -> export -> evaluate (parallel) -> gate -> on PASS, per
promote.mode, either "ci" (the release parity check, then a request to the CI to promote: the pipeline never
writes the registry's aliases) or "auto" (promote). Its parameters are cafe_core.params.RunParams."""

from __future__ import annotations

from typing import Literal

from kfp import dsl, kubernetes

from cafe_core.config import FAMILIES
from cafe_core.params import CI_TOKEN_ENV, RunParams
from components import (
    convert,
    evaluate,
    export,
    gate,
    merge_evaluation,
    prepare_data,
    promote,
    request_promotion,
    resolve_config,
    train,
    validate,
    verify_release,
)
from pipelines.common import CONVERT, DATA, LAUNCHER, LIGHT, Tasks, config_inputs, pipeline_function

DOC = """CAFe fine-tuning of LLaVA-OneVision. The parameters that describe the run become its configuration
(config: the base file in the image; overrides: any further key=value); the training job's (nodes,
gpus_per_node, train_image, namespace, s3_secret, kueue_queue, priority_class, pending_timeout_seconds,
tolerations, node_selector) its cluster section. train_mode: cluster (a training job) or local (torchrun
in the step). The inference_* parameters size the export, evaluation and release tasks."""


def build(mode: Literal["auto", "ci"] = "ci", defaults: RunParams | None = None, local: bool = False):
    """The pipeline for promote.mode `mode`, with `defaults` as its parameters' defaults (e.g. images
    pinned by digest); local=True: for kfp.local (no retries)."""

    def body(p: dict) -> None:
        t = Tasks(p, local)
        run_config = t.cpu(resolve_config(**config_inputs(resolve_config, p, promote_mode=mode)),
                           "resolve config", LIGHT).output
        data = t.cpu(prepare_data(run_config=run_config), "prepare data", DATA)
        pairs = t.cpu(convert(run_config=run_config, synthetic=data.outputs["synthetic"]), "convert", CONVERT)
        checked = t.cpu(validate(run_config=run_config, pairs=pairs.outputs["pairs"]), "validate", DATA)
        trained = t.cpu(train(run_config=run_config, pairs=pairs.outputs["pairs"], mode=p["train_mode"]),
                        "train", LAUNCHER, cache=False)
        trained.after(checked)
        model = trained.outputs["model"]
        embedded = t.gpu(export(run_config=run_config, model=model), "export")
        families = {
            family: t.gpu(evaluate(run_config=run_config, family=family, model=model,
                                   embeddings=embedded.outputs["embeddings"]), f"evaluate {family}", cache=False)
            for family in FAMILIES
        }
        scores = {f: e.outputs["metrics"] for f, e in families.items()}
        merged = t.cpu(merge_evaluation(run_config=run_config, **scores), "evaluation report", LIGHT, cache=False)
        decided = t.cpu(gate(run_config=run_config, metrics=merged.outputs["metrics"]), "gate", LIGHT, cache=False)
        decision = decided.outputs["decision_record"]
        with dsl.If(decided.outputs["Output"] == "PASS", name="gate-passed"):
            if mode == "auto":
                t.gpu(promote(run_config=run_config, decision_record=decision, model=model), "promote", cache=False)
            else:
                verified = t.gpu(verify_release(run_config=run_config, decision_record=decision, model=model),
                                 "verify release", cache=False)
                requested = t.cpu(request_promotion(run_config=run_config, decision_record=decision,
                                                    parity=verified.outputs["parity"]),
                                  "request promotion", LIGHT, cache=False)
                # The CI's token, on this task only; optional: without it the task says how to start the
                # CI's promote workflow by hand.
                kubernetes.use_secret_as_env(requested, secret_name=p["ci_token_secret"],
                                             secret_key_to_env={CI_TOKEN_ENV: CI_TOKEN_ENV}, optional=True)

    description = ("CAFe fine-tuning of LLaVA-OneVision: train, evaluate, gate, "
                   + ("promote" if mode == "auto" else "parity check, promotion request to the CI"))
    return dsl.pipeline(name="cafe", description=description)(pipeline_function(defaults or RunParams(), body, DOC))


cafe_pipeline = build()
