"""Training on Kubernetes as a Kubeflow Training Operator PyTorchJob.

- cafe_core.cluster.pytorchjob: the job specification (TrainingJobSpec, job_name) and the PyTorchJob object it
  becomes (pytorchjob, job_yaml); pure, imports no Kubernetes client. `python -m cafe_core.cluster.pytorchjob
  example` prints manifests/base/pytorchjob-template.yaml.
- cafe_core.cluster.jobs: the Kubernetes client side. run_training_job(spec) creates the job (create_job),
  follows it and the master's log until it ends, raises a TrainingJobError subclass when it fails, and cleans
  it up.
"""
