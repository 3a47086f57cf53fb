"""The offline corpus: a deterministic split of the standard library by file."""

import pytest

from trt_twotower.tokenizer import EOS_ID, builtin_tokenizer
from trt_twotower.train.corpus import stdlib_files, token_stream


def test_split_is_disjoint_deterministic_and_nonempty():
    train, heldout = stdlib_files("train"), stdlib_files("heldout")
    assert heldout and len(train) > 10 * len(heldout)
    assert not set(train) & set(heldout)
    assert stdlib_files("heldout") == heldout


def test_token_stream_separates_documents_with_eos():
    ids = token_stream(builtin_tokenizer(), "heldout", max_tokens=20000)
    assert len(ids) == 20000 and (ids == EOS_ID).sum() >= 1


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="unknown split"):
        stdlib_files("validation")
