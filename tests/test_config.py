"""Configuration: YAML + dotted overrides, placeholders, and errors that name the key and the fix."""

from __future__ import annotations

import pytest
import yaml

from cafe_core.config import CafeConfig, ConfigError, load_config

LOCAL = "configs/local.yaml"


def test_local_config_loads_and_fills_placeholders():
    cfg = load_config(LOCAL, ["run_id=r1", "root=s3://other/x"])
    assert cfg.data.output == "s3://other/x/runs/r1/convert"
    assert cfg.data.sources[0].uri == "s3://other/x/datasets/shapes-v1/train/shapes"
    assert cfg.validate_.input == cfg.data.output


def test_cluster_config_is_a_gpu_cluster_setting_the_pipeline_accepts():
    """configs/cluster.yaml (what the training job's replicas and a cluster run read): no embedded S3 in a pod,
    bf16 on GPUs, the job's cache volume, and a batch the pipeline's 2 nodes x 8 GPUs x grad_accum divide."""
    from cafe_core.params import RunParams, resolve_config

    cfg = load_config("configs/cluster.yaml", ["run_id=r1"])
    assert cfg.s3.embedded == "never" and cfg.train.precision == "bf16" and cfg.model.dtype == "bfloat16"
    assert cfg.train.cache.dir.startswith("/var/cache/cafe") and cfg.train.contrastive_batch == "step"
    run = resolve_config(RunParams(config="configs/cluster.yaml", nodes=2, gpus_per_node=8, max_steps=10), "kfp-1")
    assert run.train.nproc_per_node == 8 and run.train.global_batch_size % (2 * 8 * run.train.grad_accum) == 0


def test_overrides_reach_nested_keys_and_lists():
    cfg = load_config(LOCAL, ["data.max_samples=500", "data.sources.0.name=other", "validate.source_mix.shapes.min=0.5"])
    assert cfg.data.max_samples == 500
    assert cfg.data.sources[0].name == "other"
    assert cfg.validate_.source_mix["shapes"].min == 0.5


def test_auto_run_id_is_a_timestamp():
    assert load_config(LOCAL).run_id[:2] == "20"


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError) as err:
        load_config(LOCAL, ["data.maxsamples=3"])
    msg = str(err.value)
    assert "data.maxsamples: unknown key" in msg and "did you mean 'max_samples'" in msg
    assert "allowed keys here:" in msg and "caption_rule" in msg


def test_unknown_key_in_yaml(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("synth:\n  sed: 3\n")
    with pytest.raises(ConfigError, match=r"synth\.sed: unknown key; did you mean 'seed'"):
        load_config(bad)


def test_bad_value_names_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(LOCAL, ["data.caption_rule=longest"])
    assert "data.caption_rule" in str(err.value) and "'joined', 'first' or 'last'" in str(err.value)
    assert "given: 'longest'" in str(err.value)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.max_reject_rate=2", "data.max_reject_rate"),
        ("data.sources.5.name=x", "not an index of a list with 1 items"),
        ("noequals", "dotted.key=value"),
        ("run_id=../../etc", "run_id"),
        ("validate.caption_chars.min=10", None),
        ("validate.caption_chars.max=5", "min (20.0) is greater than max (5.0)"),
        ("data.sources.0.image_folder=/x", "only used with formats 'llava_next' and 'mmeb_train'"),
        ("data.sources.0.name=../x", "data.sources.0.name"),
    ],
)
def test_override_errors(override, fragment):
    if fragment is None:
        load_config(LOCAL, [override])
        return
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config(LOCAL, [override])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    lst = tmp_path / "l.yaml"
    lst.write_text("- a\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(lst)


def test_resolved_config_roundtrips():
    cfg = load_config(LOCAL, ["run_id=r1"])
    import yaml

    again = CafeConfig.model_validate(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg and again.digest() == cfg.digest()
    assert load_config(LOCAL, ["run_id=r2"]).digest() != cfg.digest()


def test_data_section_required_for_convert():
    with pytest.raises(ConfigError, match="no 'data' section"):
        load_config(None).require_data()


@pytest.mark.parametrize("extra", [[], ["train.loss.learnable_temperature=true"]])
@pytest.mark.parametrize("temperature", [0.005, 1.5])
def test_temperature_outside_its_range_is_refused(temperature, extra):
    """A fixed temperature, or a learnable one's initial value, must lie in [0.01, 1.0]."""
    with pytest.raises(ConfigError) as err:
        load_config(LOCAL, [f"train.loss.temperature={temperature}", *extra])
    msg = str(err.value)
    assert "train.loss.temperature" in msg and "within [0.01, 1.0]" in msg and f"given: {temperature}" in msg


def test_temperature_bounds_and_its_learning_rate():
    cfg = load_config(LOCAL, ["train.loss.temperature=0.01", "train.loss.learnable_temperature=true",
                              "train.optim.lr_temperature=5e-4"])
    assert cfg.train.loss.temperature == 0.01 and cfg.train.optim.lr_temperature == 5e-4
    assert load_config(LOCAL, ["train.loss.temperature=1.0"]).train.optim.lr_temperature == 1e-3  # default
    with pytest.raises(ConfigError, match="train.optim.lr_temperature"):
        load_config(LOCAL, ["train.optim.lr_temperature=-1"])


def test_promote_mode_is_auto_or_ci():
    assert load_config(LOCAL).promote.mode == "auto"  # `cafe run` promotes a PASS itself
    assert load_config(LOCAL, ["promote.mode=ci"]).promote.mode == "ci"
    with pytest.raises(ConfigError, match=r"promote\.mode: .*'auto' or 'ci'"):
        load_config(LOCAL, ["promote.mode=manual"])


def test_promote_ci_names_a_github_workflow():
    cfg = load_config(None, ["promote.ci.repository=acme/cafe"])
    ci = cfg.promote.ci
    assert (ci.provider, ci.api_url, ci.workflow, ci.ref, ci.config) == (
        "github", "https://api.github.com", "promote.yml", "main", "configs/cluster.yaml")
    assert load_config(None).promote.ci is None
    for bad, fragment in [
        ("promote.ci.repository=cafe", "promote.ci.repository: String should match pattern"),
        ("promote.ci.api_url=https://user:tok@api.github.com", "must not carry credentials"),
        ("promote.ci.api_url=ftp://github.com", "must be an http:// or https:// address"),
        ("promote.ci.workflow=../promote", "promote.ci.workflow: String should match pattern"),
        ("promote.ci.provider=gitlab", "promote.ci.provider: Input should be 'github'"),
    ]:
        with pytest.raises(ConfigError, match=fragment):
            load_config(None, ["promote.ci.repository=acme/cafe", bad])


def test_registry_kubeflow_section_replaces_kubeflow_url():
    cfg = load_config(None, ["registry.kubeflow.url=https://model-registry.kubeflow.svc:8443/"])
    kf = cfg.registry.kubeflow
    assert (kf.url, kf.author, kf.token_env, kf.is_secure, kf.model_format_name) == (
        "https://model-registry.kubeflow.svc:8443", "cafe", None, None, "safetensors")
    with pytest.raises(ConfigError, match=r"registry.kubeflow_url: unknown key; did you mean 'kubeflow'\?"):
        load_config(None, ["registry.kubeflow_url=http://model-registry:8080"])
    with pytest.raises(ConfigError, match="registry.kubeflow.url: Field required"):
        load_config(None, ["registry.kubeflow.author=me"])
    with pytest.raises(ConfigError, match="registry.kubeflow.token_env: String should match pattern"):
        load_config(None, ["registry.kubeflow.url=http://mr:8080", "registry.kubeflow.token_env=not a name"])


def test_cluster_yaml_describes_a_realistic_gpu_job_and_every_default_is_explicit():
    """configs/cluster.yaml's `cluster:` section: 2 nodes x 8 GPUs with the defaults that scale with them,
    every key of the section written out (so the file documents them), and valid for both APIs."""
    from cafe_core.cluster.settings import ClusterConfig

    with open("configs/cluster.yaml") as f:
        text = yaml.safe_load(f)["cluster"]
    assert set(text) == {f.alias or n for n, f in ClusterConfig.model_fields.items()}
    cfg = load_config("configs/cluster.yaml", ["run_id=r1"])
    job = cfg.cluster
    assert (job.api, job.nodes, job.gpus_per_node, job.s3_secret, job.namespace) == ("pytorchjob", 2, 8, "cafe-s3", "")
    res = job.resources(cfg.train.cache.max_gb)
    assert (res.cpu, res.memory, res.cache_size) == ("96", "768Gi", "464Gi")
    trainjob = load_config("configs/cluster.yaml", ["run_id=r1", "cluster.api=trainjob"]).cluster
    assert trainjob.api == "trainjob" and trainjob.backoff_limit == 2  # written out, still the TrainJob's default


def test_local_defaults_have_a_cpu_cluster_job():
    job = load_config(LOCAL, ["run_id=r1"]).cluster
    assert (job.api, job.nodes, job.gpus_per_node, job.image, job.cleanup) == (
        "pytorchjob", 1, 0, "cafe-train:latest", "on_success")
