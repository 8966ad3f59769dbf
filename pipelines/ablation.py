"""The a_lm:a_con ablation (the paper's Table 7): one shared dataset, one training + evaluation per ratio in
parallel, one comparison table of retrieval against understanding."""


from kfp import dsl

from components import compare_ablation, convert, evaluate_all, export, prepare_data, resolve_config, train, validate
from pipelines.common import S3_SECRET, prepare

ABLATION_FAMILIES = ["retrieval", "mmeb", "pope", "mc"]


@dsl.pipeline(name="cafe-ablation", description="CAFe a_lm:a_con sweep: retrieval vs understanding per ratio")
def ablation_pipeline(
    root: str = "s3://cafe",
    run_id: str = "",
    config: str = "configs/local.yaml",
    data_uri: str = "",
    model_preset: str = "tiny",
    model_checkpoint: str = "",
    ratios: list = [0.0, 0.05, 0.1, 0.2, 1.0],
    a_con: float = 10.0,
    temperature: float = 0.05,
    max_steps: int = 400,
    train_mode: str = "cluster",
    nodes: int = 1,
    gpus_per_node: int = 0,
    namespace: str = "kubeflow",
    base_image: str = "cafe-base:latest",
    train_image: str = "cafe-train:latest",
    overrides: list = [],
):
    """ratios: a_lm / a_con per variant (0 = contrastive only; 0.1 = the paper's default 1:10). Each
    variant's run id is the run's id + `-lm<ratio>`; all train on the run's converted pairs."""
    common = dict(config=config, root=root, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, data_uri=data_uri,
                  model_preset=model_preset, model_checkpoint=model_checkpoint, a_con=a_con,
                  temperature=temperature, max_steps=max_steps, nodes=nodes, gpus_per_node=gpus_per_node,
                  gate_rules="", overrides=overrides)
    base = prepare(resolve_config(run_id=run_id, a_lm=1.0, **common), base_image, "resolve config")
    data = prepare(prepare_data(run_config=base.output), base_image, "prepare data")
    pairs = prepare(convert(run_config=base.output, synthetic=data.outputs["synthetic"]), base_image, "convert")
    checked = prepare(validate(run_config=base.output, pairs=pairs.outputs["pairs"]), base_image, "validate")
    with dsl.ParallelFor(ratios, name="ratios") as ratio:
        variant = prepare(resolve_config(run_id=run_id, a_lm=1.0, lm_ratio=ratio, **common),
                          base_image, "variant config")
        trained = prepare(train(run_config=variant.output, pairs=pairs.outputs["pairs"], mode=train_mode, nodes=nodes,
                                gpus_per_node=gpus_per_node, train_image=train_image, namespace=namespace,
                                s3_secret=S3_SECRET), base_image, "train", cache=False)
        trained.after(checked)
        embedded = prepare(export(run_config=variant.output, model=trained.outputs["model"]), base_image, "export")
        scored = prepare(evaluate_all(run_config=variant.output, families=ABLATION_FAMILIES,
                                      model=trained.outputs["model"], embeddings=embedded.outputs["embeddings"]),
                         base_image, "evaluate", cache=False)
    prepare(compare_ablation(run_config=base.output, variants=dsl.Collected(scored.outputs["metrics"])),
            base_image, "compare", cache=False)
