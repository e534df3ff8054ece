import pytest
import torch
from transformers import AutoTokenizer

from quantize.data import DataError, load_split, tokenize_sequences
from quantize.models import prepare_default_model


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(prepare_default_model()))


@pytest.mark.parametrize("corpus", ["wikipedia", "owt"])
def test_calib_and_eval_splits_are_disjoint(corpus):
    calib, ev = load_split(corpus, "calib"), load_split(corpus, "eval")
    assert calib and ev
    assert not set(calib) & set(ev)


def test_tokenize_gives_fixed_length_windows_in_order(tok):
    docs = load_split("wikipedia", "calib")
    ids = tokenize_sequences(docs, tok, 32, 5)
    assert ids.shape == (5, 32) and ids.dtype == torch.long
    first = tok(docs[0], add_special_tokens=False)["input_ids"]
    assert ids.flatten()[:32].tolist() == first[:32]


def test_empty_text_file_is_rejected(tmp_path, tok):
    f = tmp_path / "empty.jsonl"
    f.write_text('{"0": "   "}\n')
    with pytest.raises(DataError, match="no text"):
        load_split(str(f), "calib")


def test_too_short_text_is_rejected(tmp_path, tok):
    f = tmp_path / "short.txt"
    f.write_text("just a few words")
    with pytest.raises(DataError):
        tokenize_sequences(load_split(str(f), "calib"), tok, 64, 4)


def test_chat_calibration_wraps_each_document_in_the_template(tok):
    from quantize.data import CHAT_PROMPTS, as_chat

    docs = load_split("wikipedia", "calib")[:3]
    rendered = as_chat(docs, tok)
    for i, (doc, chat) in enumerate(zip(docs, rendered)):
        # user turn, then the document as the assistant's turn, with the template's role markers
        user = chat.index(CHAT_PROMPTS[i])
        assert user < chat.index("assistant", user) < chat.index(doc)
    ids = tokenize_sequences(docs, tok, 64, None, chat=True)
    expected = [t for chat in rendered for t in tok(chat, add_special_tokens=False)["input_ids"]]
    assert ids.flatten().tolist() == expected[: ids.numel()]
    assert not torch.equal(ids[:1], tokenize_sequences(docs, tok, 64, None)[:1])


def test_chat_calibration_needs_a_chat_template(tok):
    import copy

    bare = copy.copy(tok)
    bare.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        tokenize_sequences(load_split("wikipedia", "calib"), bare, 32, 2, chat=True)
