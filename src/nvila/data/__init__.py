"""Datasets for training and evaluating NVILA models without downloads.

``nvila.data.synthetic`` generates SynthVILA, the procedurally generated image and video QA task
families of spec training.md §7.3, in the trainer's LLaVA-style JSONL format.
"""

from .synthetic import FAMILIES, build_synth_tokenizer, generate, generate_eval_split, get_family

__all__ = ["FAMILIES", "build_synth_tokenizer", "generate", "generate_eval_split", "get_family"]
