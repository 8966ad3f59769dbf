from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from cafe_core.params import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def train(run_config: str, pairs: Input[Dataset], mode: str, model: Output[Model]):
    """CAFe training. mode "cluster": a training job described by the run configuration's cluster section
    (nodes x gpus_per_node on its image, namespace, Secret, queue, ...), followed until it ends; mode
    "local": torchrun with train.nproc_per_node processes in this container."""
    from cafe_core.stages import train as stages
    from cafe_core.stages.step import publish, run_step

    if mode == "local":
        result = run_step(stages.train, run_config)
    else:  # "cluster" (RunParams.train_mode allows no other value)
        result = run_step(stages.train_in_cluster, run_config)
    publish(result, model)
