"""RL fine-tuning of Hugging Face causal LMs: a TensorDict TransformersWrapper and a Hydra GRPO loop."""

from pipeline.policy import TransformersWrapper

__all__ = ["TransformersWrapper"]
