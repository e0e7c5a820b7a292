"""umT5 tokenisation with sentencepiece, from the tokenizer file in the user's checkpoint folder.

Matches Wan's `HuggingfaceTokenizer(seq_len=512, clean='whitespace')`: HTML entities unescaped,
whitespace collapsed and stripped (no lowercasing), EOS appended, truncated to keep the EOS, and
right-padded with the pad id.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bcjax.errors import BadFileError

# Where the file sits in a Wan2.1 checkpoint folder (and in a google/umt5-xxl snapshot).
_CANDIDATES = ("spiece.model", "google/umt5-xxl/spiece.model", "tokenizer.model")


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning: ftfy (when installed) and double HTML unescape, then whitespace collapsed."""
    try:  # Wan runs ftfy.fix_text first; it only repairs mojibake, so it is optional here
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


def find_tokenizer_model(path: str | Path) -> Path:
    """The sentencepiece file: `path` itself, or spiece.model inside a checkpoint folder."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for rel in _CANDIDATES:
            if (path / rel).is_file():
                return path / rel
        raise FileNotFoundError(f"no umT5 tokenizer in {path}: looked for {', '.join(_CANDIDATES)}")
    raise FileNotFoundError(f"umT5 tokenizer file {path} does not exist")


def load_tokenizer(path: str | Path):
    """A sentencepiece processor for the umT5 vocabulary (file or checkpoint folder)."""
    import sentencepiece as spm

    model_file = find_tokenizer_model(path)
    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
    except (RuntimeError, OSError, ValueError) as e:  # sentencepiece's parse errors are RuntimeErrors
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise BadFileError(f"tokenizer {model_file} is not a sentencepiece model ({first})") from None
    if sp.get_piece_size() < 1:
        raise BadFileError(f"tokenizer {model_file} has no pieces")
    if sp.eos_id() < 0 or sp.pad_id() < 0:
        raise BadFileError(f"tokenizer {model_file} defines no eos/pad id (eos={sp.eos_id()}, pad={sp.pad_id()})")
    return sp


def tokenize(sp, prompts: str | Sequence[str], text_len: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """prompts -> (ids int32 [B, text_len], mask bool [B, text_len]), EOS included in the mask."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = np.full((len(prompts), text_len), sp.pad_id(), np.int32)
    mask = np.zeros((len(prompts), text_len), bool)
    for i, pieces in enumerate(sp.encode([clean_prompt(p) for p in prompts])):
        # HF truncates the pieces, then appends EOS: a long prompt still ends in EOS
        row = pieces[: text_len - 1] + [sp.eos_id()]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = True
    return ids, mask
