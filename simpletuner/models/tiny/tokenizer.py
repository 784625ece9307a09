"""A CLIP BPE tokenizer made locally: a small vocabulary of whole words plus byte fallbacks."""

from __future__ import annotations

import json
import os
import tempfile

# Words the tiny tokenizer knows as whole tokens; everything else falls back to bytes.
TOKENIZER_WORDS = (
    "a an the of on in with and photo image picture background "
    "red green blue yellow orange purple pink white black grey gray brown cyan magenta "
    "circle square triangle stripes striped shape shapes small large big "
    "horizontal vertical diagonal plain bright dark"
).split()

CLIP_MAX_LENGTH = 77


def _byte_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character table byte-level BPE uses.

    Printable Latin-1 bytes map to themselves; the rest are shifted past 255
    so that every byte has a visible, non-whitespace character.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    table: dict[int, str] = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _tiny_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """A CLIP-style BPE vocabulary: every byte (alone and word-final) plus a few whole words."""
    symbols = list(_byte_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in dict.fromkeys(TOKENIZER_WORDS):
        # Merge left to right: "red" -> "r e", "re d</w>" gives the token "red</w>".
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = f"{pieces[0]} {pieces[1]}"
            joined = pieces[0] + pieces[1]
            if pair not in merges:
                merges.append(pair)
            if joined not in tokens:
                tokens.append(joined)
            pieces = [joined] + pieces[2:]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_vocab_files(folder: str) -> None:
    """Write the tiny vocab.json and merges.txt (the files a CLIP tokenizer is read from)."""
    vocab, merges = _tiny_vocab_and_merges()
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as handle:
        json.dump(vocab, handle)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n" + "\n".join(merges) + "\n")


def make_tokenizer(pad_token: str = "<|endoftext|>"):
    """A CLIPTokenizer read from the tiny vocab files, padding to CLIP's 77 positions."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_vocab_files(folder)
        return CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH)
