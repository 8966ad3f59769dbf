"""cafe_core.cluster.pytorchjob without a cluster: job names, what TrainingJobSpec refuses, and that building a
job imports no Kubernetes client. The PyTorchJob objects themselves are validated against the Training Operator's
CRD schema in test_manifests.py; creating and following them in test_cluster_jobs.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from cafe_core.cluster.pytorchjob import MAX_NAME, TrainingJobSpec, job_name

NS = "ml"
ARGV = ["-m", "cafe_core.cli", "train", "--config", "/app/configs/cluster.yaml", "run_id=r7"]


def test_job_name_from_run_ids():
    assert job_name("20250101-120000") == "cafe-train-20250101-120000"
    assert job_name("Run_1") != job_name("run-1")
    long = job_name("x" * 100)
    assert len(long) <= MAX_NAME == 48
    assert TrainingJobSpec(name=long, namespace=NS, image="i", argv=ARGV).name == long


@pytest.mark.parametrize("field, value, words", [
    ("name", "Cafe_Train", "lowercase"),
    ("name", "7-starts-with-digit", "starting with a letter"),
    ("env", {"AWS_SECRET_ACCESS_KEY": "x"}, "Secret"),
    ("env", {"MASTER_ADDR": "x"}, "Training Operator"),
    ("memory_request", "16 GB", "quantity"),
    ("nodes", 0, "greater than or equal to 1"),
    ("cleanup", "sometimes", "always"),
])
def test_spec_rejects_with_a_clear_message(field, value, words):
    kw = {"name": "cafe-train-x", "namespace": NS, "image": "i", "argv": ARGV, field: value}
    with pytest.raises(ValidationError, match=words):
        TrainingJobSpec(**kw)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        TrainingJobSpec(name="cafe-train-x", image="i", argv=ARGV, gpu=1)


def test_building_a_job_imports_no_kubernetes_client():
    code = ("import sys, cafe_core.cluster.pytorchjob as p; p.job_yaml(p.pytorchjob(p.example_spec())); "
            "print(sorted(m for m in ('kubernetes', 'urllib3') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
