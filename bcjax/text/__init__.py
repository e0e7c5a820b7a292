"""The umT5 text encoder Wan conditions on, and its sentencepiece tokenizer."""

from bcjax.text.tokenizer import clean_prompt, load_tokenizer, tokenize
from bcjax.text.umt5 import UMT5Config, encode, init_params, param_shapes, prompt_embeddings

__all__ = ["UMT5Config", "clean_prompt", "encode", "init_params", "load_tokenizer", "param_shapes",
           "prompt_embeddings", "tokenize"]
