"""The CAFe pipeline: convert -> validate -> train -> export -> evaluate (parallel) -> gate -> promote (on PASS).
Its parameters are cafe_core.params.RunParams (names, types, defaults; a test keeps them equal)."""

from kfp import dsl

from cafe_core.config import FAMILIES
from cafe_core.params import RunParams
from components import (
    convert,
    evaluate,
    export,
    gate,
    merge_evaluation,
    prepare_data,
    promote,
    resolve_config,
    train,
    validate,
)
from pipelines.common import S3_SECRET, config_inputs, prepare

P = RunParams()


@dsl.pipeline(name="cafe", description="CAFe fine-tuning of LLaVA-OneVision: train, evaluate, gate, promote")
def cafe_pipeline(
    root: str = P.root,
    run_id: str = P.run_id,
    config: str = P.config,
    data_uri: str = P.data_uri,
    model_preset: str = P.model_preset,
    model_checkpoint: str = P.model_checkpoint,
    a_lm: float = P.a_lm,
    a_con: float = P.a_con,
    temperature: float = P.temperature,
    max_steps: int = P.max_steps,
    train_mode: str = P.train_mode,
    nodes: int = P.nodes,
    gpus_per_node: int = P.gpus_per_node,
    namespace: str = P.namespace,
    base_image: str = P.base_image,
    train_image: str = P.train_image,
    gate_rules: str = P.gate_rules,
    overrides: list = P.overrides,
):
    """root: S3 prefix of the run's artifacts ({root}/runs/{run_id}/). run_id: empty = the KFP run's id.
    config: base configuration file in the image (or overridden by the parameters here). data_uri: a
    LLaVA-OneVision parquet prefix; empty = the synthetic shapes data. model_checkpoint: a Hugging Face folder
    (s3:// or path) that replaces model_preset. train_mode: cluster (a PyTorchJob of nodes x gpus_per_node on
    train_image) or local (torchrun inside the step). gate_rules: the gate's rules file (path or s3://).
    overrides: any further `key=value` config overrides."""
    cfg = prepare(resolve_config(**config_inputs(locals()), a_lm=a_lm, gate_rules=gate_rules), base_image,
                  "resolve config")
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
