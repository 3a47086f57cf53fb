"""The ``logprobs`` object of an OpenAI completion, from the context tower's scores.

OpenAI's legacy completions answer ``tokens`` (each token's text), ``token_logprobs``,
``top_logprobs`` (token text → log-probability) and ``text_offset`` (where each token's text
starts in the prompt + completion). The token texts must join back to the text exactly, which
decoding each id alone does not do for a byte-level vocabulary (a character may span tokens),
so each token's text is what decoding one more token adds; a token that ends inside a
character adds nothing, and the one that completes it carries the whole character.
"""

from __future__ import annotations

from typing import Optional

from ..tokenizer import TwoTowerTokenizer

# a token's score as it travels: [token, logprob, [[token, logprob], ...]]
Score = list


def token_texts(tokenizer: TwoTowerTokenizer, ids: list[int]) -> list[str]:
    """Each token's share of ``decode(ids)``; they join back to it."""
    texts, shown = [], ""
    for end in range(1, len(ids) + 1):
        full = tokenizer.decode(ids[:end])
        if full.endswith("\ufffd") and end < len(ids):
            texts.append("")  # inside a character: its last byte's token carries it
            continue
        texts.append(full[len(shown):])
        shown = full
    return texts


def logprobs_object(tokenizer: TwoTowerTokenizer, prompt_ids: list[int],
                    completion_ids: list[int], prompt_scores: Optional[list[Score]],
                    completion_scores: list[Score]) -> dict:
    """With ``prompt_scores`` (echo), the prompt's tokens first — the first has no score,
    nothing comes before it — then the completion's; offsets count from the prompt's start."""
    texts = token_texts(tokenizer, prompt_ids + completion_ids)
    prompt_texts, completion_texts = texts[:len(prompt_ids)], texts[len(prompt_ids):]
    offsets, at = [], 0
    for text in texts:
        offsets.append(at)
        at += len(text)
    echo = prompt_scores is not None
    shown = prompt_texts + completion_texts if echo else completion_texts
    scores = ([None] + list(prompt_scores) if echo else []) + list(completion_scores)
    return {"tokens": shown,
            "token_logprobs": [None if s is None else s[1] for s in scores],
            "top_logprobs": [None if s is None else _top(tokenizer, s[2]) for s in scores],
            "text_offset": offsets if echo else offsets[len(prompt_ids):]}


def _top(tokenizer: TwoTowerTokenizer, pairs: list) -> dict:
    """The alternatives by their own text (two ids that decode alike keep the likelier)."""
    top: dict[str, float] = {}
    for token, logprob in pairs:
        top.setdefault(tokenizer.decode([token], skip_special_tokens=False), logprob)
    return top
