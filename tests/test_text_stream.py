"""Streaming detokenization: incomplete UTF-8 characters and possible stop-string starts are held back."""

from pllm import Tokenizer
from pllm.actors.text_stream import TextStream


def byte_tokenizer() -> Tokenizer:
    return Tokenizer.train(["plain ascii text, héllo wörld, ünïcode ✓ " * 20], vocab_size=300)


def stream_pieces(tok, ids, stop=None, step=1):
    text, pieces = TextStream(tok, stop), []
    for i in range(0, len(ids), step):
        last = i + step >= len(ids)
        delta, stopped = text.feed(ids[i:i + step], final=last)
        pieces.append(delta)
        if stopped:
            return pieces, True
    return pieces, False


def test_split_characters_are_never_sent_half():
    tok = byte_tokenizer()
    ids = tok.encode("✓ ünïcode ✓")
    pieces, _ = stream_pieces(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_stop_string_ends_the_text_before_it_and_is_never_sent():
    tok = byte_tokenizer()
    ids = tok.encode("plain ascii text, héllo")
    pieces, stopped = stream_pieces(tok, ids, stop=["text,"])
    assert stopped and "".join(pieces) == "plain ascii "
    pieces, stopped = stream_pieces(tok, ids, stop=["nowhere"])
    assert not stopped and "".join(pieces) == "plain ascii text, héllo"
