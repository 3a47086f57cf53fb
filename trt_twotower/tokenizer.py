"""The tokenizer of a checkpoint: real checkpoints bring their own ``tokenizer.json``; the
built-in model ships a small byte-level BPE trained on Python source (deterministic, so the
shipped file can be rebuilt byte for byte by ``build_scripts/train_tokenizer.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .errors import TwoTowerError

TOKENIZER_FILE = "tokenizer.json"
BUILTIN_TOKENIZER = Path(__file__).resolve().parent / "builtin" / TOKENIZER_FILE
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<mask>")   # ids 0, 1, 2, 3 (spec §1, mask id 3)
PAD_ID, BOS_ID, EOS_ID, MASK_ID = range(4)


class TokenizerError(TwoTowerError, ValueError):
    """A tokenizer file that is missing, unreadable or lacks the TwoTower special tokens."""


class TwoTowerTokenizer:
    def __init__(self, tokenizer: Tokenizer, source: str) -> None:
        for expected, token in enumerate(SPECIAL_TOKENS):
            found = tokenizer.token_to_id(token)
            if found is None and expected == MASK_ID:
                continue  # real checkpoints may spell the mask differently; id 3 is what counts
            if found is not None and found != expected:
                raise TokenizerError(f"{source}: special token {token!r} has id {found}, "
                                     f"expected {expected}")
        self._tok = tokenizer
        self.source = source

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        known = [i for i in ids if 0 <= i < self.vocab_size]
        return self._tok.decode(known, skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        self._tok.save(str(path))
        return path


def load_tokenizer(directory: str | Path) -> TwoTowerTokenizer:
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise TokenizerError(f"no {TOKENIZER_FILE} in {directory}: a checkpoint directory "
                             "needs its tokenizer")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises its own exception types
        raise TokenizerError(f"{path} is not a valid tokenizer file: {err}") from err
    return TwoTowerTokenizer(tokenizer, str(path))


def builtin_tokenizer() -> TwoTowerTokenizer:
    return load_tokenizer(BUILTIN_TOKENIZER.parent)


def train_builtin_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Tokenizer:
    """Byte-level BPE (any text round-trips exactly) with the special tokens first."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer
