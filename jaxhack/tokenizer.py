"""Tokenizers behind one small interface: encode / decode / eos_token_ids / pad_token_id / vocab_size.

- `ByteTokenizer`: the embedded default for the TINY config (no files needed).
  ids: 0 pad, 1 `<|endoftext|>`, 2 `<|im_end|>`, 3 `<|im_start|>`, byte b -> 4 + b (4..259).
  Ids 260.. (the rest of TINY's 512-row vocabulary) are unused and decode to U+FFFD.
- `HFTokenizer`: wraps `transformers.AutoTokenizer.from_pretrained(local_dir)`.

`load_tokenizer("byte")` or `load_tokenizer(local_dir)` returns one of them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

PAD_ID, ENDOFTEXT_ID, IM_END_ID, IM_START_ID = 0, 1, 2, 3
BYTE_OFFSET = 4
SPECIAL_TOKENS = {"<|endoftext|>": ENDOFTEXT_ID, "<|im_end|>": IM_END_ID, "<|im_start|>": IM_START_ID}
SPECIAL_RE = re.compile("|".join(re.escape(s) for s in SPECIAL_TOKENS))
# the files of a local HF tokenizer (copied by `convert` into CKPT/tokenizer/ and by `export` into an HF dir)
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                      "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


class ByteTokenizer:
    """UTF-8 bytes plus three chat special tokens; consistent with config.TINY (eos 2, bos 1, pad 0)."""

    vocab_size = BYTE_OFFSET + 256  # 260 used ids; fits TINY's vocab_size of 512
    pad_token_id = PAD_ID
    eos_token_ids = (IM_END_ID,)
    bos_token_id = ENDOFTEXT_ID
    name = "byte"

    def encode(self, text: str) -> list[int]:
        """Text -> ids. The special-token strings in `text` become their single ids."""
        ids: list[int] = []
        pos = 0
        for m in SPECIAL_RE.finditer(text):
            ids.extend(b + BYTE_OFFSET for b in text[pos:m.start()].encode("utf-8"))
            ids.append(SPECIAL_TOKENS[m.group(0)])
            pos = m.end()
        ids.extend(b + BYTE_OFFSET for b in text[pos:].encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text. Pad is always dropped; specials are written as their strings unless skipped;
        invalid UTF-8 and unused ids (>= 260) become U+FFFD."""
        special_str = {v: k for k, v in SPECIAL_TOKENS.items()}
        parts: list[str] = []
        pending = bytearray()

        def flush():
            if pending:
                parts.append(pending.decode("utf-8", errors="replace"))
                pending.clear()

        for i in ids:
            i = int(i)
            if BYTE_OFFSET <= i < BYTE_OFFSET + 256:
                pending.append(i - BYTE_OFFSET)
                continue
            flush()
            if i == PAD_ID:
                continue
            if i in special_str:
                if not skip_special_tokens:
                    parts.append(special_str[i])
            else:
                parts.append("\ufffd")
        flush()
        return "".join(parts)


class HFTokenizer:
    """A local Hugging Face tokenizer behind the same small interface as ByteTokenizer."""

    def __init__(self, local_dir: str | Path):
        from transformers import AutoTokenizer  # imported lazily: transformers is slow to import

        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise FileNotFoundError(f"{local_dir}: tokenizer directory not found")
        self.name = str(local_dir)
        self.hf = AutoTokenizer.from_pretrained(str(local_dir), local_files_only=True)
        self.vocab_size = len(self.hf)
        self.bos_token_id = self.hf.bos_token_id
        self.eos_token_ids = _eos_ids(local_dir, self.hf)
        if not self.eos_token_ids:
            raise ValueError(f"{local_dir}: no eos token id found in the tokenizer, config.json or "
                             "generation_config.json")
        pad = self.hf.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_ids[0]

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _eos_ids(local_dir: Path, hf_tok) -> tuple[int, ...]:
    """Union of eos ids from generation_config.json, config.json and the tokenizer, in that order."""
    ids: list[int] = []
    for fname in ("generation_config.json", "config.json"):
        p = local_dir / fname
        if p.is_file():
            try:
                eos = json.loads(p.read_text()).get("eos_token_id")
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: line {e.lineno}: invalid JSON ({e.msg})") from None
            for e in (eos if isinstance(eos, list) else [eos]):
                if e is not None and int(e) not in ids:
                    ids.append(int(e))
    if hf_tok.eos_token_id is not None and int(hf_tok.eos_token_id) not in ids:
        ids.append(int(hf_tok.eos_token_id))
    return tuple(ids)


def load_tokenizer(path_or_name: str | Path = "byte") -> ByteTokenizer | HFTokenizer:
    """"byte" -> ByteTokenizer; a local directory with tokenizer files -> HFTokenizer."""
    if str(path_or_name) == "byte":
        return ByteTokenizer()
    return HFTokenizer(path_or_name)
