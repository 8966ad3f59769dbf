from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Metrics, Model, Output

from cafe_core.params import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def gate(run_config: str, metrics: Input[Metrics], decision_record: Output[Artifact], why: Output[Markdown]) -> str:
    """PASS/FAIL against the rules and the champion (returned: the pipeline branches on it); the record
    goes to S3, the "why" to the UI."""
    from cafe_core.stages.release import gate as stage
    from cafe_core.stages.step import publish, run_step

    result = run_step(stage, run_config)
    publish(result, decision_record, documents={"why.md": why})
    with open(decision_record.path, "w") as f:  # the record itself, not the gate's folder
        f.write(result.meta["decision_uri"] + "\n")
    return result.meta["decision"]


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def promote(run_config: str, decision_record: Input[Artifact], model: Input[Model], champion: Output[Model]):
    """The model behind a PASS decision becomes the registry's champion (checks sha256 and re-embeds)."""
    from cafe_core.stages.release import promote as stage
    from cafe_core.stages.step import publish, run_step

    publish(run_step(stage, run_config), champion)
