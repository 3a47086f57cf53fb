"""The built-in tokenizer and tokenizer files of checkpoints."""

import json

import pytest

from trt_twotower.tokenizer import (EOS_ID, MASK_ID, TokenizerError, builtin_tokenizer,
                                    load_tokenizer)


@pytest.mark.parametrize("text", ["def f(x):\n    return x ** 2\n", "naïve — 漢字 🙂\t\r\n",
                                  "", "    \n\n"])
def test_any_text_round_trips_exactly(text):
    tok = builtin_tokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_special_ids_and_vocabulary_size():
    tok = builtin_tokenizer()
    assert tok.vocab_size == 1024
    assert tok._tok.token_to_id("</s>") == EOS_ID and tok._tok.token_to_id("<mask>") == MASK_ID
    assert tok.decode([EOS_ID, MASK_ID]) == ""


def test_missing_and_corrupt_files_raise(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="not a valid tokenizer"):
        load_tokenizer(tmp_path)


def test_special_tokens_at_other_ids_are_rejected(tmp_path):
    tok = builtin_tokenizer()
    tok.save(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    for entry in data["added_tokens"]:
        if entry["content"] == "</s>":
            entry["content"] = "<eos>"
        elif entry["content"] == "<s>":
            entry["content"] = "</s>"
    data["model"]["vocab"]["</s>"], data["model"]["vocab"]["<s>"] = 1, 2
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="special token"):
        load_tokenizer(tmp_path)
