"""kdjax: knowledge distillation of image classifiers in JAX/Flax NNX."""
