"""Flax NNX image classifiers, looked up by name.

Every model in `MODELS` follows one contract, because the distillation trainer handles teachers and students
generically:

* `Model(*, num_classes, image_shape=(H, W, C), rngs, dtype=jnp.float32, **arch_kwargs)`; `dtype` is the compute
  dtype (e.g. bf16), parameters are always float32.
* `model(x, *, train) -> (logits, features)`: `x` is NHWC; `logits` are float32 (N, num_classes); `features` is a
  tuple with one output per stage (NHWC for conv nets, (N, D) for MLPs; compute dtype); `features[-1]` feeds the head.
* Parameters live only in `model.stages` (an `nnx.List`, stage i makes `features[i]`) and `model.head` (a
  `ClassifierHead`), so every parameter path starts with `('stages', i, ...)` or `('head', ...)`.
* `model.stage_channels[i]` is the channel (last-axis) size of `features[i]`.
* `train` is passed explicitly: BatchNorm uses batch statistics and updates its running averages (`nnx.BatchStat`)
  only when `train=True`; dropout is active only when `train=True`. `model.train()` / `model.eval()` are not needed.
* Models with dropout hold an RNG state (from the 'dropout' stream, else 'default', of the constructor's `rngs`).

One registered entry breaks the stages/head rule on purpose: 'ensemble' (`kdjax.models.ensemble`) keeps whole models
under `members`, returns the mean of their logits and the first member's features, and so cannot be frozen stage by
stage.

Families: torchvision-style ResNets (`resnet`), the CIFAR ResNets of the CIFAR-100 distillation benchmarks
(`resnet_cifar`), pre-activation Wide ResNets and ResNet-164 (`preact_resnet`), VGG-BN (`vgg`), ShuffleNet V2
(`shufflenet`), small CNN/MLP students (`small`); each module's docstring says what its features are.
"""

# Importing the architecture modules registers their models.
from kdjax.models import ensemble, preact_resnet, resnet, resnet_cifar, shufflenet, small, vgg  # noqa: F401
from kdjax.models.layers import ClassifierHead, ConvBNReLU, StagedClassifier
from kdjax.models.registry import MODELS, create_model, register_model

# What a model of one's own is built from (README: Extending kdjax).
__all__ = ['MODELS', 'ClassifierHead', 'ConvBNReLU', 'StagedClassifier', 'create_model', 'register_model']
