"""Training on Kubernetes: a Kubeflow Training Operator PyTorchJob or a Kubeflow Trainer TrainJob (cluster.api).

- cafe_core.cluster.settings: the `cluster:` section of the configuration (ClusterConfig); pure.
- cafe_core.cluster.spec: the job's specification (TrainingJobSpec), job_spec(cfg, owner) that builds it from a
  configuration (the train step and `cafe job render` both use it), and the replica pieces both APIs share; pure.
- cafe_core.cluster.pytorchjob / cafe_core.cluster.trainjob: the API objects (`python -m ... example` prints
  manifests/base/pytorchjob-template.yaml / trainjob-template.yaml); pure.
- cafe_core.cluster.kinds: both APIs as data (JobKind: where they live, how to read their state and find their
  pods) and job_object(spec); pure.
- cafe_core.cluster.jobs: the Kubernetes client side. run_training_job(spec) creates the job, follows it and the
  rank-0 pod's log until it ends, raises a TrainingJobError subclass when it fails, and cleans it up.

docs/training-jobs.md describes the settings, both APIs, Kueue and what the step reports.
"""
