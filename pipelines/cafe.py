"""The CAFe pipeline: convert -> validate -> train -> export -> evaluate (parallel) -> gate -> promote (on PASS)."""


from kfp import dsl

from components import (convert, evaluate, export, gate, merge_evaluation, prepare_data, promote, resolve_config,
                        train, validate)
from pipelines.common import FAMILIES, S3_SECRET, prepare


@dsl.pipeline(name="cafe", description="CAFe fine-tuning of LLaVA-OneVision: train, evaluate, gate, promote")
def cafe_pipeline(
    root: str = "s3://cafe",
    run_id: str = "",
    config: str = "configs/local.yaml",
    data_uri: str = "",
    model_preset: str = "tiny",
    model_checkpoint: str = "",
    a_lm: float = 1.0,
    a_con: float = 10.0,
    temperature: float = 0.05,
    max_steps: int = 400,
    train_mode: str = "cluster",
    nodes: int = 1,
    gpus_per_node: int = 0,
    namespace: str = "kubeflow",
    base_image: str = "cafe-base:latest",
    train_image: str = "cafe-train:latest",
    gate_rules: str = "configs/gate.yaml",
    overrides: list = [],
):
    """root: S3 prefix of the run's artifacts ({root}/runs/{run_id}/). run_id: empty = the KFP run's id.
    config: base configuration file in the image (or overridden by the parameters here). data_uri: a
    LLaVA-OneVision parquet prefix; empty = the synthetic shapes data. model_checkpoint: a Hugging Face folder
    (s3:// or path) that replaces model_preset. train_mode: cluster (a PyTorchJob of nodes x gpus_per_node on
    train_image) or local (torchrun inside the step). gate_rules: the gate's rules file (path or s3://).
    overrides: any further `key=value` config overrides."""
    cfg = prepare(resolve_config(
        config=config, root=root, run_id=run_id, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, data_uri=data_uri,
        model_preset=model_preset, model_checkpoint=model_checkpoint, a_lm=a_lm, a_con=a_con,
        temperature=temperature, max_steps=max_steps, nodes=nodes, gpus_per_node=gpus_per_node,
        gate_rules=gate_rules, overrides=overrides), base_image, "resolve config")
    run_config = cfg.output
    data = prepare(prepare_data(run_config=run_config), base_image, "prepare data")
    pairs = prepare(convert(run_config=run_config, synthetic=data.outputs["synthetic"]), base_image, "convert")
    checked = prepare(validate(run_config=run_config, pairs=pairs.outputs["pairs"]), base_image, "validate")
    trained = prepare(train(run_config=run_config, pairs=pairs.outputs["pairs"], mode=train_mode, nodes=nodes,
                            gpus_per_node=gpus_per_node, train_image=train_image, namespace=namespace,
                            s3_secret=S3_SECRET), base_image, "train", cache=False)
    trained.after(checked)
    embedded = prepare(export(run_config=run_config, model=trained.outputs["model"]), base_image, "export")
    families = {
        family: prepare(evaluate(run_config=run_config, family=family, model=trained.outputs["model"],
                                 embeddings=embedded.outputs["embeddings"]), base_image, f"evaluate {family}", cache=False)
        for family in FAMILIES
    }
    merged = prepare(merge_evaluation(run_config=run_config, **{f: t.outputs["metrics"] for f, t in families.items()}),
                     base_image, "evaluation report", cache=False)
    decided = prepare(gate(run_config=run_config, metrics=merged.outputs["metrics"]), base_image, "gate", cache=False)
    with dsl.If(decided.outputs["Output"] == "PASS", name="gate-passed"):
        prepare(promote(run_config=run_config, decision_record=decided.outputs["decision_record"],
                        model=trained.outputs["model"]), base_image, "promote", cache=False)
