"""The a_lm:a_con ablation (the paper's Table 7): one shared dataset, one training + evaluation per ratio in
parallel, one comparison table of retrieval against understanding. Its parameters are
cafe_core.params.AblationParams (a test keeps them equal)."""

from __future__ import annotations

from kfp import dsl

from cafe_core.params import AblationParams
from cafe_core.stages.evaluate import ABLATION_FAMILIES
from components import compare_ablation, convert, evaluate_all, export, prepare_data, resolve_config, train, validate
from pipelines.common import CONVERT, DATA, LAUNCHER, LIGHT, Tasks, config_inputs, pipeline_function

# Variants trained at once. In the cluster each is a multi-node GPU job: started all together, partly placed
# jobs can hold GPUs while waiting for each other's. Compile-time in KFP (`cafe compile --ablation-parallelism`).
PARALLELISM = 1

DOC = """CAFe a_lm:a_con sweep. ratios: a_lm / a_con per variant (0 = contrastive only; 0.1 = the paper's
default 1:10); one more variant trains with the LM loss only (a_con = 0, `<run id>-lmonly`). Each variant
records its ratio in its config (`ablation.lm_ratio`), runs as `<run id>-lm<ratio>`, and trains on the run's
converted pairs; the other parameters are the cafe pipeline's."""


def build(parallelism: int = PARALLELISM, defaults: AblationParams | None = None, local: bool = False):
    """The ablation pipeline with `parallelism` variants at a time (0: all at once), `defaults` as its
    parameters' defaults; local=True: for kfp.local (no retries)."""

    def body(p: dict) -> None:
        t = Tasks(p, local)
        base = t.cpu(resolve_config(**config_inputs(resolve_config, p)), "resolve config", LIGHT)
        data = t.cpu(prepare_data(run_config=base.output), "prepare data", DATA)
        pairs = t.cpu(convert(run_config=base.output, synthetic=data.outputs["synthetic"]), "convert", CONVERT)
        checked = t.cpu(validate(run_config=base.output, pairs=pairs.outputs["pairs"]), "validate", DATA)

        def variant(label: str = "", after=None, **which):  # one variant's configuration, training, evaluation
            config = t.cpu(resolve_config(**config_inputs(resolve_config, p, **which)), f"{label}variant config",
                           LIGHT).output
            trained = t.cpu(train(run_config=config, pairs=pairs.outputs["pairs"], mode=p["train_mode"]),
                            f"{label}train", LAUNCHER, cache=False)
            trained.after(checked, *([after] if after is not None else []))
            embedded = t.gpu(export(run_config=config, model=trained.outputs["model"]), f"{label}export")
            return t.gpu(evaluate_all(run_config=config, families=ABLATION_FAMILIES, model=trained.outputs["model"],
                                      embeddings=embedded.outputs["embeddings"]), f"{label}evaluate", cache=False)

        with dsl.ParallelFor(p["ratios"], name="ratios", parallelism=parallelism) as ratio:
            scored = variant(lm_ratio=ratio)
        # What the contrastive term adds: the same data, a_con = 0; after the ratios unless all run at once.
        lm_only = variant("LM-only ", scored if parallelism else None, lm_only=True)
        t.cpu(compare_ablation(run_config=base.output, variants=dsl.Collected(scored.outputs["metrics"]),
                               lm_only=lm_only.outputs["metrics"]), "compare", LIGHT, cache=False)

    description = "CAFe a_lm:a_con sweep: retrieval vs understanding per ratio"
    return dsl.pipeline(name="cafe-ablation", description=description)(
        pipeline_function(defaults or AblationParams(), body, DOC))


ablation_pipeline = build()
