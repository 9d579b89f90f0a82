"""Caption -> 512 token ids, as the reference text encoder does it.

`TextEncoder.compute_text_embeddings_online` (predict2/text_encoders/text_encoder.py): a two-message chat (fixed
system prompt, the caption as the user message, both as `[{"type": "text", ...}]` content lists) rendered with the
Qwen2.5-VL chat template (`add_generation_prompt=False`, `add_vision_id=False`), tokenized, then right-padded with
the tokenizer's pad id to 512 or truncated to the first 512. The tokenizer and its template come from a local
directory (transformers' AutoTokenizer, imported lazily; nothing is downloaded).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

SYSTEM_PROMPT = "You are a helpful assistant who will provide prompts to an image generator."
NUM_TOKENS = 512  # NUM_EMBEDDING_PADDING_TOKENS


class TokenizerFilesError(ValueError):
    """The local tokenizer directory lacks a file (named in the message)."""


def conversation(caption: str) -> list[dict]:
    return [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {"role": "user", "content": [{"type": "text", "text": caption}]}]


class CaptionTokenizer:
    """Hugging Face tokenizer + chat template from `model_dir`; `ids(captions)` -> int32 (N, 512)."""

    def __init__(self, model_dir: str | os.PathLike, num_tokens: int = NUM_TOKENS):
        model_dir = os.fspath(model_dir)
        config = os.path.join(model_dir, "tokenizer_config.json")
        if not os.path.isfile(config):
            raise TokenizerFilesError(f"{config}: missing (the tokenizer must be in the local model directory)")
        has_fast = os.path.isfile(os.path.join(model_dir, "tokenizer.json"))
        has_bpe = all(os.path.isfile(os.path.join(model_dir, f)) for f in ("vocab.json", "merges.txt"))
        if not (has_fast or has_bpe):
            raise TokenizerFilesError(f"{os.path.join(model_dir, 'tokenizer.json')}: missing "
                                      "(nor vocab.json + merges.txt) in the local model directory")
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.template = self.tokenizer.chat_template or _template_file(model_dir)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            raise TokenizerFilesError(f"{config}: the tokenizer has no pad token (pad_token)")
        self.num_tokens = num_tokens

    def text(self, caption: str) -> str:
        return self.tokenizer.apply_chat_template(conversation(caption), tokenize=False, add_generation_prompt=False,
                                                  add_vision_id=False, chat_template=self.template)

    def ids(self, captions: Sequence[str]) -> np.ndarray:
        out = np.full((len(captions), self.num_tokens), self.pad_id, np.int32)
        for row, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise TypeError(f"caption {row} is {type(caption).__name__}, not str")
            ids = self.tokenizer(self.text(caption))["input_ids"][: self.num_tokens]
            out[row, : len(ids)] = ids
        return out


def _template_file(model_dir: str) -> str:
    for name in ("chat_template.jinja", "chat_template.json"):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                return f.read() if name.endswith(".jinja") else json.load(f)["chat_template"]
    raise TokenizerFilesError(f"{model_dir}: no chat template (tokenizer_config.json 'chat_template', "
                              "chat_template.jinja or chat_template.json)")
