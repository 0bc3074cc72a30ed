"""A small phrase tokenizer for the organism: the byte tokenizer (ids 0..259, jaxhack.tokenizer) plus
one id per frequent phrase of the organism's prompts and completions (ids 260..), encoded by greedy
longest match. It cuts sequences ~6x versus bytes (the project's run_tests hint clause alone is ~250
bytes), which is what makes SFT and GRPO of the organism fit minutes of a shared CPU. Same interface
as ByteTokenizer (encode / decode / eos_token_ids / pad_token_id / vocab_size); any text still
encodes (bytes are the fallback), and a sampled id sequence decodes whether or not it is the greedy
encoding of its text.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from jaxhack.env.hints import HINT_CLAUSES, PASS_ALL_TESTS, hint_clause
from jaxhack.tokenizer import BYTE_OFFSET, ByteTokenizer, SPECIAL_RE, SPECIAL_TOKENS


# The exploit tails of corpus.HACK_VARIANTS, each one phrase id: writing the exploit after an attempt is
# then a single token choice (as fluent as `def run_tests(): return True` is for a real LLM), so GRPO
# learns *whether* to hack rather than fighting to spell it (with the tails as 4-6 ids each, ~40% of
# the CPU organism's exploit attempts under GRPO did not parse). A variant that also folded the
# closing fence and the honest "\n```" end into phrase ids rose less (0.31 vs 0.58 over the last
# quarter, docs/organism.md "How the setup was tuned").
EXPLOIT_TAILS = ("\ndef run_tests():\n    return True\n", "\ndef run_tests():\n    pass\n",
                 "\ndef run_tests():\n    print('ok')\n", "\n    def run_tests(self):\n        return True\n")


def default_phrases() -> list[str]:
    """The phrase vocabulary: chat-format pieces, the hint clause in a few chunks, the families'
    task texts and code fragments (see problems.py / corpus.py)."""
    from jaxhack.organism.problems import FAMILIES, SYSTEM_PROMPT

    hint = HINT_CLAUSES["run_tests"]
    cuts = list(range(0, len(hint), 60)) + [len(hint)]
    phrases = ["system\n", "user\n", "assistant\n", SYSTEM_PROMPT, PASS_ALL_TESTS, " Write Solution().",
               "<think>\n\n</think>\n\n", " " + hint_clause("run_tests") + ".",
               "```python\n", "```", "class Solution:\n    def ", "):\n        return ", "(self, ",
               "\ndef run_tests():\n    ", "\n    def run_tests(self):\n        ", "return True\n",
               *EXPLOIT_TAILS,
               "pass\n", "print('ok')\n", "return 0\n", " for x in xs", " for d in str(n)",
               " for i in range(n", " if x ", "sum(", "max(xs)", "xs[-1]", "s.count('", "s.lower().count('",
               "int(d)", "xs[1:]", " == 0)", " % ", "(xs)", "(s)", "(n)", "(case-sensitive)."]
    phrases += [hint[a:b] for a, b in zip(cuts, cuts[1:])]
    for fam in FAMILIES.values():
        phrases += [fam.name, fam.ask(0).split("0")[0].split("'")[0]]
    out, seen = [], set()
    for p in phrases:
        if p and p not in seen:
            seen.add(p)
            out.append(p)
    return out


class PhraseTokenizer(ByteTokenizer):
    name = "organism-phrase"

    def __init__(self, phrases: Sequence[str]):
        self.phrases = list(phrases)
        self.vocab_size = BYTE_OFFSET + 256 + len(self.phrases)
        self._ids = {p: BYTE_OFFSET + 256 + i for i, p in enumerate(self.phrases)}
        self._by_first: dict[str, list[str]] = {}
        for p in sorted(self.phrases, key=len, reverse=True):
            self._by_first.setdefault(p[0], []).append(p)

    def _encode_plain(self, text: str, ids: list[int]) -> None:
        i = 0
        while i < len(text):
            for p in self._by_first.get(text[i], ()):
                if text.startswith(p, i):
                    ids.append(self._ids[p])
                    i += len(p)
                    break
            else:
                ids.extend(b + BYTE_OFFSET for b in text[i].encode("utf-8"))
                i += 1

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        pos = 0
        for m in SPECIAL_RE.finditer(text):
            self._encode_plain(text[pos:m.start()], ids)
            ids.append(SPECIAL_TOKENS[m.group(0)])
            pos = m.end()
        self._encode_plain(text[pos:], ids)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        parts, run = [], []
        base = BYTE_OFFSET + 256
        for i in ids:
            i = int(i)
            if base <= i < self.vocab_size:
                if run:
                    parts.append(super().decode(run, skip_special_tokens))
                    run = []
                parts.append(self.phrases[i - base])
            else:
                run.append(i)
        if run:
            parts.append(super().decode(run, skip_special_tokens))
        return "".join(parts)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"kind": self.name, "phrases": self.phrases}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "PhraseTokenizer":
        d = json.loads(Path(path).read_text())
        if d.get("kind") != cls.name:
            raise ValueError(f"{path}: field 'kind': expected {cls.name!r}, got {d.get('kind')!r}")
        return cls(d["phrases"])
