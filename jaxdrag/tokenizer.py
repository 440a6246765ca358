"""The CLIP tokenizer, with OpenAI's text cleanup so ids match the original ``SimpleTokenizer``.

transformers' ``CLIPTokenizer`` (v5) loads an SD-1.5 ``tokenizer/`` folder without torch but does
not apply the original's ``ftfy.fix_text`` + double ``html.unescape`` + whitespace collapse, so
prompts with curly quotes or HTML entities tokenized differently. ``Tokenizer.__call__`` applies
that cleanup first.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import numpy as np

BUNDLED = Path(__file__).parent / "assets" / "sd15_tokenizer"


def clean_text(text: str) -> str:
    """OpenAI CLIP's ``basic_clean`` + ``whitespace_clean``."""
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class Tokenizer:
    """Pads/truncates to ``max_length`` (77) with the pad token (``<|endoftext|>`` for SD-1.5).

    ``ids(prompts)`` → int32 (B, 77); ``prompt_lengths(prompts)`` → (B,) int32, the number P of
    leading tokens DragText regularises: BOS + prompt word tokens, i.e. the index of the first EOS
    (ALGORITHMS.md §3.2), at most 76.
    """

    def __init__(self, folder: str | Path | None = None, max_length: int = 77,
                 pad_token: str | None = None):
        from transformers import CLIPTokenizer

        folder = Path(folder) if folder is not None else BUNDLED
        needed = ("vocab.json", "merges.txt")
        missing = [n for n in needed if not (folder / n).exists()]
        if missing:
            raise FileNotFoundError(f"{folder}: tokenizer folder lacks {', '.join(missing)}")
        self.folder = folder
        # pad_token: SD-2.x pads with "!" (its tokenizer folder says so; a single file has none)
        extra = {"pad_token": pad_token} if pad_token is not None else {}
        self.tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length, **extra)
        self.max_length = max_length
        self.eos_id = self.tok.eos_token_id

    def ids(self, prompts: list[str]) -> np.ndarray:
        prompts = [clean_text(p) for p in prompts]
        out = self.tok(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                       return_tensors="np")
        return out["input_ids"].astype(np.int32)

    def prompt_lengths(self, prompts: list[str]) -> np.ndarray:
        ids = self.ids(prompts)
        is_eos = ids[:, :-1] == self.eos_id  # index 76 is never taken (reference skips it)
        first = np.where(is_eos.any(1), is_eos.argmax(1), self.max_length - 1)
        return first.astype(np.int32)

    def __call__(self, prompts: list[str]) -> np.ndarray:
        return self.ids(prompts)
