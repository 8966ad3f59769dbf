from kfp import dsl

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def resolve_config(config: str, root: str, run_id: str, kfp_run_id: str, data_uri: str, model_preset: str,
                   model_checkpoint: str, a_lm: float, a_con: float, temperature: float, max_steps: int,
                   nodes: int, gpus_per_node: int, gate_rules: str, overrides: list, lm_ratio: float = -1.0,
                   train_data: str = "") -> str:
    """The run's resolved configuration (YAML) from the base file and the pipeline's parameters."""
    from cafe_core.steps import resolve_config as resolve

    text = resolve(config, root, run_id, kfp_run_id, data_uri, model_preset, model_checkpoint, a_lm, a_con,
                   temperature, max_steps, nodes, gpus_per_node, gate_rules, [str(o) for o in overrides],
                   lm_ratio, train_data)
    print(f"config: the run's resolved configuration ({len(text)} characters) is this task's output")
    return text
