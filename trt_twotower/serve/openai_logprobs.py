"""The ``logprobs`` object of an OpenAI completion, from the context tower's scores.

OpenAI's legacy completions answer ``tokens`` (each token's text), ``token_logprobs``,
``top_logprobs`` (token text → log-probability) and ``text_offset`` (where each token's text
starts in the prompt + completion). The token texts must join back to the text exactly, which
decoding each id alone does not do for a byte-level vocabulary (a character may span tokens),
so each token's text is what decoding it adds after the tokens before it; a token that ends
inside a character adds nothing, and the one that completes it carries the whole character.
"""

from __future__ import annotations

import functools
from typing import Optional

from ..tokenizer import TwoTowerTokenizer

# a token's score as it travels: [token, logprob, [[token, logprob], ...]]
Score = list


class TokenTexts:
    """Token texts worked out once each, as ids arrive (a stream's would otherwise be decoded
    again for every chunk): each new token is decoded with the group of tokens since the last
    character boundary, after the group before it, so a decoder that treats a sequence's
    start specially sees the context it sees in the whole text."""

    def __init__(self, tokenizer: TwoTowerTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.done: list[str] = []      # texts of the tokens up to the last boundary
        self.before: list[int] = []    # the group that ends at that boundary
        self.pending: list[int] = []   # tokens after it, inside one character

    def extend(self, ids: list[int]) -> None:
        for token in ids:
            self.ids.append(token)
            self.pending.append(token)
            added = self._added(self.pending)
            if not added.endswith("\ufffd"):
                self.done += [""] * (len(self.pending) - 1) + [added]
                self.before, self.pending = self.pending, []

    def texts(self, count: int) -> list[str]:
        """The first ``count`` tokens' texts; a character still open at the end goes to its
        last token as the decoder shows it."""
        texts = self.done[:count]
        if count > len(self.done):
            open_ = self.pending[:count - len(self.done)]
            texts += [""] * (len(open_) - 1) + [self._added(open_)]
        return texts

    def _added(self, group: list[int]) -> str:
        base = self.tokenizer.decode(self.before)
        return self.tokenizer.decode(self.before + group)[len(base):]


def token_texts(tokenizer: TwoTowerTokenizer, ids: list[int]) -> list[str]:
    """Each token's share of ``decode(ids)``; they join back to it."""
    texts = TokenTexts(tokenizer)
    texts.extend(ids)
    return texts.texts(len(ids))


def logprobs_object(tokenizer: TwoTowerTokenizer, texts: list[str], prompt_length: int,
                    prompt_scores: Optional[list[Score]], completion_scores: list[Score],
                    first: int = 0, last: Optional[int] = None) -> dict:
    """Entries ``first`` to ``last`` of the prompt's tokens with ``prompt_scores`` (echo; the
    first token has no score, nothing comes before it) then the completion's. ``texts`` are
    the prompt's and completion's token texts; offsets count from the prompt's start."""
    echo = prompt_scores is not None
    start = 0 if echo else prompt_length
    scores = ([None] + list(prompt_scores) if echo else []) + list(completion_scores)
    scores = scores[first:last]
    offset = sum(len(t) for t in texts[:start + first])
    entry = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for text, score in zip(texts[start + first:], scores):
        entry["tokens"].append(text)
        entry["token_logprobs"].append(None if score is None else score[1])
        entry["top_logprobs"].append(None if score is None else _top(tokenizer, score[2]))
        entry["text_offset"].append(offset)
        offset += len(text)
    return entry


def _top(tokenizer: TwoTowerTokenizer, pairs: list) -> dict:
    """The alternatives by their own text (two ids that decode alike keep the likelier)."""
    top: dict[str, float] = {}
    for token, logprob in pairs:
        top.setdefault(_alone(tokenizer, token), logprob)
    return top


@functools.lru_cache(maxsize=65536)
def _alone(tokenizer: TwoTowerTokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)
