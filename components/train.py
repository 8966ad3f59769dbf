from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def train(run_config: str, pairs: Input[Dataset], mode: str, nodes: int, gpus_per_node: int, train_image: str,
          namespace: str, s3_secret: str, model: Output[Model]):
    """CAFe training. mode "cluster": a Training Operator PyTorchJob (nodes x gpus_per_node, train_image),
    followed until it ends; mode "local": torchrun with train.nproc_per_node processes in this container."""
    from cafe_core.steps import train_cluster, train_local

    if mode == "local":
        result = train_local(run_config)
    elif mode == "cluster":
        result = train_cluster(run_config, train_image, nodes, gpus_per_node, namespace, s3_secret)
    else:
        raise ValueError(f"train mode {mode!r}: use 'cluster' (PyTorchJob) or 'local' (torchrun in the step)")
    model.metadata.update(result.metadata())
    with open(model.path, "w") as f:
        f.write(result.uri + "\n")
