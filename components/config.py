from kfp import dsl

from cafe_core.params import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def resolve_config(kfp_run_id: str, root: str, run_id: str, config: str, data_uri: str, model_preset: str,
                   model_checkpoint: str, a_con: float, temperature: float, max_steps: int, train_mode: str,
                   nodes: int, gpus_per_node: int, namespace: str, train_image: str, s3_secret: str,
                   kueue_queue: str, priority_class: str, pending_timeout_seconds: int, tolerations: list,
                   node_selector: dict, overrides: list, a_lm: float = 1.0, gate_rules: str = "",
                   lm_ratio: float = -1.0, promote_mode: str = "", lm_only: bool = False) -> str:
    """The run's resolved configuration (YAML): the base file, the pipeline's parameters (cafe_core.params;
    the training job's as its cluster section), the overrides. lm_ratio >= 0: the configuration of that
    a_lm:a_con ablation variant; lm_only: the ablation's LM-only variant (a_con = 0). promote_mode: the
    promotion the pipeline is built for (promote.mode)."""
    import sys

    from cafe_core.config import ConfigError
    from cafe_core.errors import exit_line
    from cafe_core.params import RunParams, parse
    from cafe_core.params import resolve_config as resolve

    given = {k: v for k, v in locals().items() if k in RunParams.model_fields}
    try:
        cfg = resolve(parse(RunParams, given), kfp_run_id, lm_ratio if lm_ratio >= 0 else None, promote_mode or None,
                      lm_only)
    except ConfigError as e:
        print(exit_line(e), file=sys.stderr, flush=True)
        raise SystemExit(e.exit_code) from None
    print(f"config: run {cfg.run_id}, config digest {cfg.digest()} (the resolved YAML is this task's output)")
    return cfg.to_yaml()
