"""The `cluster:` section (cafe_core.cluster.settings): quantities, defaults that scale with the GPUs of a node,
and the refusals that name the key and the fix, here and through load_config's overrides."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError

from cafe_core.cluster.settings import (
    ClusterConfig,
    Toleration,
    default_cache_size,
    gib,
    parse_quantity,
)
from cafe_core.config import ConfigError, load_config


@pytest.mark.parametrize("text, value", [
    ("4", Decimal(4)), ("500m", Decimal("0.5")), ("16Gi", Decimal(16 * 2**30)), ("1.5Gi", Decimal(3 * 2**29)),
    ("2k", Decimal(2000)), ("2E", Decimal(2 * 10**18)), ("1e3", Decimal(1000)), ("3E2", Decimal(300)),
    ("100n", Decimal("1e-7")),
])
def test_quantities_are_read_as_kubernetes_reads_them(text, value):
    assert parse_quantity(text) == value


def test_a_malformed_quantity_is_refused():
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity("16 GB")
    assert gib("512Mi") == 0.5


def test_defaults_scale_with_the_gpus_of_a_node():
    eight = ClusterConfig(gpus_per_node=8).resources(cache_max_gb=400)
    assert (eight.cpu, eight.memory, eight.memory_limit, eight.shm_size) == ("96", "768Gi", "1280Gi", "64Gi")
    assert eight.cpu_limit is None  # no CFS throttling of NCCL's threads
    assert eight.cache_size == "464Gi"  # 400 GiB of shards + 64 GiB for the model
    assert eight.ephemeral_storage == "524Gi"  # 20 + 5 x 8 for the container, + the cache volume on the same disk
    one = ClusterConfig(gpus_per_node=1).resources(cache_max_gb=100)
    assert (one.cpu, one.memory, one.memory_limit, one.shm_size, one.ephemeral_storage) == (
        "12", "96Gi", "160Gi", "8Gi", "189Gi")
    cpu = ClusterConfig().resources(cache_max_gb=100)  # a CPU job: small, its cache bounded by sizeLimit only
    assert (cpu.cpu, cpu.memory, cpu.memory_limit, cpu.shm_size, cpu.ephemeral_storage, cpu.cache_size) == (
        "4", "16Gi", "32Gi", "2Gi", "20Gi", "164Gi")
    assert default_cache_size(0.5) == "65Gi"


def test_requirements_put_devices_in_requests_and_limits():
    c = ClusterConfig(gpus_per_node=4, cpu="40", cpu_limit="48", memory="300Gi", memory_limit="400Gi",
                      extra_resources={"rdma/rdma_shared_device_a": 1})
    req = c.resources(cache_max_gb=10).requirements()
    assert req["requests"] == {"cpu": "40", "memory": "300Gi", "ephemeral-storage": "114Gi", "nvidia.com/gpu": "4",
                               "rdma/rdma_shared_device_a": "1"}
    assert req["limits"] == {"cpu": "48", "memory": "400Gi", "nvidia.com/gpu": "4", "rdma/rdma_shared_device_a": "1"}
    amd = ClusterConfig(gpus_per_node=2, gpu_resource="amd.com/gpu")
    assert amd.resources(1).requirements()["limits"]["amd.com/gpu"] == "2"
    assert amd.all_tolerations() == [{"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_an_explicit_memory_drops_the_scaled_limit_it_could_exceed():
    res = ClusterConfig(gpus_per_node=1, memory="400Gi").resources(1)
    assert res.memory == "400Gi" and res.memory_limit is None


def test_gpu_jobs_tolerate_the_gpu_taint_and_the_configured_ones():
    extra = {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute", "tolerationSeconds": 60}
    gpu = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    c = ClusterConfig(gpus_per_node=8, tolerations=[extra, gpu])  # the GPU one again: not twice
    assert c.all_tolerations() == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}, extra]
    assert ClusterConfig(tolerations=[extra]).all_tolerations() == [extra]  # a CPU job: only what is configured


@pytest.mark.parametrize("kw, words", [
    ({"cpu": "4 cores"}, "cluster.cpu='4 cores' is not a Kubernetes quantity"),
    ({"memory": "0"}, "must be positive"),
    ({"gpus_per_node": 8, "memory_limit": "100Gi"}, "cluster.memory=768Gi is more than cluster.memory_limit=100Gi"),
    ({"cpu": "8", "cpu_limit": "4"}, "raise cpu_limit or lower cpu"),
    ({"shm_size": "40Gi"}, "/dev/shm is memory"),
    ({"namespace": "Team_A"}, "cluster.namespace='Team_A' is not a namespace name"),
    ({"kueue_queue": "GPU queue"}, "cluster.kueue_queue"),
    ({"gpu_resource": "gpu"}, "not an extended resource name"),
    ({"extra_resources": {"cpu": "2"}}, "cpu, memory and GPUs have their own keys"),
    ({"node_selector": {"pool": "h100 nodes"}}, "not a valid node label"),
    ({"affinity": {"nodeAfinity": {}}}, "unknown keys \\['nodeAfinity'\\]"),
    ({"env": {"AWS_SECRET_ACCESS_KEY": "x"}}, "Secret named by cluster.s3_secret"),
    ({"env": {"PET_NNODES": "2"}}, "rendezvous"),
    ({"env": {"MASTER_ADDR": "x"}}, "rendezvous"),
    ({"env": {"CAFE_CONFIG_YAML": "x"}}, "set by the train step"),
    ({"env": {"NCCL_IB_DISABLE": True}}, "quote the value"),
    ({"image_pull_secrets": ["Regcred"]}, "not a valid Secret name"),
    ({"nodes": 2, "scheduling": {"min_available": 3}}, "the gang could never start"),
    ({"cleanup": "sometimes"}, "always"),
    ({"restart_policy": "Always"}, "OnFailure"),
])
def test_bad_settings_are_refused_naming_the_key(kw, words):
    with pytest.raises(ValidationError, match=words):
        ClusterConfig(**kw)


@pytest.mark.parametrize("key, value", [
    ("restart_policy", "ExitCode"), ("backoff_limit", 5), ("ttl_seconds_after_finished", 60),
    ("scheduling", {"queue": "gang"}), ("priority_class", "high"), ("image_pull_policy", "Always"),
])
def test_a_trainjob_refuses_what_only_a_pytorchjob_has(key, value):
    ClusterConfig(api="pytorchjob", **{key: value})  # fine there
    words = f"cluster.{key}=.*a TrainJob has no such setting.*cluster.api=pytorchjob"
    with pytest.raises(ValidationError, match=words):
        ClusterConfig(api="trainjob", **{key: value})
    ClusterConfig(api="trainjob")  # the defaults are fine: they are what a TrainJob does anyway, or not set


def test_numbers_from_yaml_and_overrides_become_quantities_and_env_values():
    c = ClusterConfig(cpu=8, cpu_limit=9.5, env={"NCCL_IB_TIMEOUT": 22}, s3_secret="")
    assert (c.cpu, c.cpu_limit, c.env, c.s3_secret) == ("8", "9.5", {"NCCL_IB_TIMEOUT": "22"}, None)


def test_tolerations_are_checked_like_kubernetes_does():
    with pytest.raises(ValidationError, match="operator Exists takes no value"):
        Toleration(key="a", operator="Exists", value="b")
    with pytest.raises(ValidationError, match="must use operator Exists"):
        Toleration(operator="Equal", value="b")
    with pytest.raises(ValidationError, match="only applies to effect NoExecute"):
        Toleration(key="a", operator="Exists", effect="NoSchedule", toleration_seconds=5)
    assert Toleration(operator="Exists").manifest() == {"operator": "Exists"}  # tolerate everything


def test_overrides_reach_the_cluster_section_and_errors_name_it():
    cfg = load_config("configs/local.yaml", ["run_id=r1", "cluster.api=trainjob", "cluster.gpus_per_node=4",
                                             "cluster.node_selector.pool=h100", "cluster.kueue_queue=gpu"])
    assert (cfg.cluster.api, cfg.cluster.gpus_per_node, cfg.cluster.node_selector, cfg.cluster.kueue_queue) == (
        "trainjob", 4, {"pool": "h100"}, "gpu")
    with pytest.raises(ConfigError, match=r"cluster\.gpus_per_nod: unknown key; did you mean 'gpus_per_node'"):
        load_config("configs/local.yaml", ["cluster.gpus_per_nod=8"])
    with pytest.raises(ConfigError, match=r"cluster: .*cluster.backoff_limit=5: a TrainJob has no such setting"):
        load_config("configs/local.yaml", ["cluster.api=trainjob", "cluster.backoff_limit=5"])
