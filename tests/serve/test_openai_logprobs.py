"""Token texts for the logprobs object: worked out incrementally, they equal what decoding
each prefix adds (the brute-force definition) and join back to the decoded text, characters
that span tokens included."""

import pytest

from trt_twotower.serve.openai_logprobs import TokenTexts, logprobs_object, token_texts
from trt_twotower.tokenizer import builtin_tokenizer

TEXT = "def naïve(x):\n    return '→ café 😀' * x  # ünïcode\n"


def _prefix_diffs(tokenizer, ids):
    """The definition, decoded from scratch for every prefix."""
    texts, shown = [], ""
    for end in range(1, len(ids) + 1):
        full = tokenizer.decode(ids[:end])
        if full.endswith("\ufffd") and end < len(ids):
            texts.append("")
            continue
        texts.append(full[len(shown):])
        shown = full
    return texts


def test_token_texts_equal_the_prefix_definition_and_join_back():
    tokenizer = builtin_tokenizer()
    ids = tokenizer.encode(TEXT)
    texts = token_texts(tokenizer, ids)
    assert texts == _prefix_diffs(tokenizer, ids) and "".join(texts) == TEXT
    assert "" in texts, "the sample has characters spanning tokens"


@pytest.mark.parametrize("step", [1, 3, 7])
def test_fed_piece_by_piece_they_equal_the_whole_at_every_point(step):
    tokenizer = builtin_tokenizer()
    ids = tokenizer.encode(TEXT)
    texts = TokenTexts(tokenizer)
    for end in range(step, len(ids) + step, step):
        texts.extend(ids[len(texts.ids):end])
        count = len(texts.ids)
        assert texts.texts(count) == _prefix_diffs(tokenizer, ids[:count])


def test_entries_in_slices_equal_the_whole_object():
    tokenizer = builtin_tokenizer()
    ids = tokenizer.encode(TEXT)
    texts, prompt = token_texts(tokenizer, ids), 5
    scores = [[t, -0.5 * i, [[t, -0.5 * i]]] for i, t in enumerate(ids)]
    whole = logprobs_object(tokenizer, texts, prompt, scores[1:prompt], scores[prompt:])
    parts = [logprobs_object(tokenizer, texts, prompt, scores[1:prompt], scores[prompt:],
                             first, first + 4) for first in range(0, len(ids), 4)]
    for key, values in whole.items():
        assert [v for part in parts for v in part[key]] == values, key
    assert whole["token_logprobs"][0] is None and whole["text_offset"][-1] + len(
        whole["tokens"][-1]) == len(TEXT)
