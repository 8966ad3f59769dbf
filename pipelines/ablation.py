"""The a_lm:a_con ablation (the paper's Table 7): one shared dataset, one training + evaluation per ratio in
parallel, one comparison table of retrieval against understanding. Its parameters are
cafe_core.params.AblationParams (a test keeps them equal)."""

from kfp import dsl

from cafe_core.params import AblationParams
from cafe_core.stages.evaluate import ABLATION_FAMILIES
from components import compare_ablation, convert, evaluate_all, export, prepare_data, resolve_config, train, validate
from pipelines.common import S3_SECRET, config_inputs, prepare

P = AblationParams()
# Variants trained at once. In the cluster each is a multi-node GPU job: started all together, partly placed
# jobs can hold GPUs while waiting for each other's. Compile-time in KFP (`cafe compile --ablation-parallelism`).
PARALLELISM = 1


def build(parallelism: int = PARALLELISM):
    """The ablation pipeline with `parallelism` variants at a time (0: all at once)."""

    @dsl.pipeline(name="cafe-ablation", description="CAFe a_lm:a_con sweep: retrieval vs understanding per ratio")
    def ablation_pipeline(
        root: str = P.root,
        run_id: str = P.run_id,
        config: str = P.config,
        data_uri: str = P.data_uri,
        model_preset: str = P.model_preset,
        model_checkpoint: str = P.model_checkpoint,
        ratios: list = P.ratios,
        a_con: float = P.a_con,
        temperature: float = P.temperature,
        max_steps: int = P.max_steps,
        train_mode: str = P.train_mode,
        nodes: int = P.nodes,
        gpus_per_node: int = P.gpus_per_node,
        namespace: str = P.namespace,
        base_image: str = P.base_image,
        train_image: str = P.train_image,
        overrides: list = P.overrides,
    ):
        """ratios: a_lm / a_con per variant (0 = contrastive only; 0.1 = the paper's default 1:10). Each variant
        records its ratio in its config (`ablation.lm_ratio`), runs as `<run id>-lm<ratio>`, and trains on the
        run's converted pairs."""
        inputs = config_inputs(locals())
        base = prepare(resolve_config(**inputs), base_image, "resolve config")
        data = prepare(prepare_data(run_config=base.output), base_image, "prepare data")
        pairs = prepare(convert(run_config=base.output, synthetic=data.outputs["synthetic"]), base_image, "convert")
        checked = prepare(validate(run_config=base.output, pairs=pairs.outputs["pairs"]), base_image, "validate")
        with dsl.ParallelFor(ratios, name="ratios", parallelism=parallelism) as ratio:
            variant = prepare(resolve_config(**inputs, lm_ratio=ratio), base_image, "variant config")
            trained = prepare(train(run_config=variant.output, pairs=pairs.outputs["pairs"], mode=train_mode,
                                    nodes=nodes, gpus_per_node=gpus_per_node, train_image=train_image,
                                    namespace=namespace, s3_secret=S3_SECRET), base_image, "train", cache=False)
            trained.after(checked)
            embedded = prepare(export(run_config=variant.output, model=trained.outputs["model"]), base_image, "export")
            scored = prepare(evaluate_all(run_config=variant.output, families=ABLATION_FAMILIES,
                                          model=trained.outputs["model"], embeddings=embedded.outputs["embeddings"]),
                             base_image, "evaluate", cache=False)
        prepare(compare_ablation(run_config=base.output, variants=dsl.Collected(scored.outputs["metrics"])),
                base_image, "compare", cache=False)

    return ablation_pipeline


ablation_pipeline = build()
