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
    """The model behind a PASS decision becomes the registry's champion (checks sha256 and re-embeds);
    promote.mode auto only."""
    from cafe_core.stages.release import promote as stage
    from cafe_core.stages.step import publish, run_step

    publish(run_step(stage, run_config), champion)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def verify_release(run_config: str, decision_record: Input[Artifact], model: Input[Model], parity: Output[Artifact]):
    """The parity check of a PASS (promote.mode ci): a sample of evaluation items re-embedded from the model
    files to be promoted must match the exported embeddings; the committed parity record goes next to the
    decision, for the CI's promotion to check. A mismatch fails the step (after publishing the record), so
    nothing is requested."""
    import sys

    from cafe_core.errors import StageFailed, exit_line
    from cafe_core.stages.release import verify_release as stage
    from cafe_core.stages.step import publish, run_step

    result = run_step(stage, run_config)
    publish(result, parity)
    if result.failure:
        print(exit_line(StageFailed(result.failure)), file=sys.stderr, flush=True)
        raise SystemExit(StageFailed.exit_code)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def request_promotion(run_config: str, decision_record: Input[Artifact], parity: Input[Artifact],
                      request: Output[Artifact]):
    """Asks the CI to run its promote workflow for this decision (its token: CAFE_CI_TOKEN, from a Secret),
    or prints how to start that workflow by hand when no CI is configured. Promotes nothing itself."""
    from cafe_core.stages.release import request_promotion as stage
    from cafe_core.stages.step import publish, run_step

    publish(run_step(stage, run_config), request)
