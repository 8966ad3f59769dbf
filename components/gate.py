from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Metrics, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def gate(run_config: str, metrics: Input[Metrics], decision_record: Output[Artifact],
         why: Output[Markdown]) -> str:
    """PASS/FAIL against the rules and the champion (returned: the pipeline branches on it); the record
    goes to S3, the "why" to the UI."""
    from cafe_core.steps import gate as step

    result, decision, summary = step(run_config)
    decision_record.metadata.update(result.metadata())
    with open(decision_record.path, "w") as f:
        f.write(result.meta["decision_uri"] + "\n")
    with open(why.path, "w") as f:
        f.write(summary)
    print(summary)
    return decision
