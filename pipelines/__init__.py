"""KFP v2 pipelines: the CAFe training pipeline and the a_lm:a_con ablation. `cafe compile` writes their
YAML to pipelines/compiled/ (committed; a test fails when it is stale)."""
