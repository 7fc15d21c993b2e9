"""jaxkd.models.spm: llama.cpp's SentencePiece merge order on a small vocabulary worked out
by hand, user-defined tokens, byte fallback, and a GGUF round trip."""

import gguf
import pytest

from jaxkd.models import spm
from jaxkd.schema import ConfigError

B = "\u2581"  # '▁'
BYTES = [f"<0x{b:02X}>" for b in range(256)]
# id: 0 <pad> 1 <eos> 2 <bos> 3 "\n" (user) 4 "  " (user) then pieces and their scores.
PIECES = [("a", -1.0), ("b", -1.0), ("c", -1.0), (B, -1.0), ("ab", -2.0), ("bc", -1.5),
          ("abc", -3.0), (B + "a", -2.5), (B + "abc", -0.5), ("é", -1.0)]


def tokenizer():
    tokens = ["<pad>", "<eos>", "<bos>", "\n", "  "] + [p for p, _ in PIECES] + BYTES
    scores = [0.0] * 5 + [s for _, s in PIECES] + [0.0] * 256
    types = [spm.CONTROL] * 3 + [spm.USER_DEFINED] * 2 + [spm.NORMAL] * len(PIECES) + [
        spm.BYTE] * 256
    return tokens, scores, types


def encode(text, **kwargs):
    tok = spm.SpmTokenizer(*tokenizer(), bos_id=2, eos_id=1, **kwargs)
    return [tok.tokens[i] for i in tok.encode(text)], tok


def test_merges_follow_the_scores_then_the_leftmost_pair():
    # "abc": pairs ab (-2.0) and bc (-1.5): bc first -> a|bc; "abc" is a token -> abc.
    assert encode("abc")[0] == ["<bos>", "abc"]
    # "abab": ab and ab tie (-2.0), ba is no token: left ab, right ab; "abab" no token.
    assert encode("abab")[0] == ["<bos>", "ab", "ab"]
    # " abc" -> ▁abc; " ab" -> ▁a|b? pairs ▁a (-2.5), ab (-2.0): ab first -> ▁|ab, and
    # "▁ab" is no token.
    assert encode(" abc")[0] == ["<bos>", B + "abc"]
    assert encode(" ab")[0] == ["<bos>", B, "ab"]


def test_user_defined_tokens_bytes_and_decode():
    pieces, tok = encode("ab\n\ncb  é€")
    # "\n" and "  " are cut out first; "€" is no token: its three UTF-8 bytes.
    assert pieces == ["<bos>", "ab", "\n", "\n", "c", "b", "  ", "é",
                      "<0xE2>", "<0x82>", "<0xAC>"]
    assert tok.decode(tok.encode("ab\n\ncb  é€")) == "ab\n\ncb  é€"
    assert tok.encode("", add_bos=False) == [] and tok.encode("") == [2]
    # Control tokens in the text are text unless parse_special.
    assert encode("<eos>")[0][:3] == ["<bos>", "<0x3C>", "<0x65>"]
    assert tok.encode("a<eos>", parse_special=True) == [2, tok.ids["a"], 1]
    assert encode("ab", add_space_prefix=True)[0] == ["<bos>", B, "ab"]


def write_vocab(path, tokens, scores, types, *, model="llama"):
    """A GGUF file holding only a tokenizer (bos 2, eos 1, <bos> added), as a teacher's."""
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_from_gguf_reads_the_vocabulary(tmp_path):
    tokens, scores, types = tokenizer()
    write_vocab(tmp_path / "v.gguf", tokens, scores, types)
    tok = spm.from_gguf(str(tmp_path / "v.gguf"))
    assert tok.encode(" abc") == [2, tok.ids[B + "abc"]] and tok.vocab_size == len(tokens)
    write_vocab(tmp_path / "bpe.gguf", tokens, scores, types, model="gpt2")
    with pytest.raises(ConfigError, match=r"bpe.gguf: tokenizer.ggml.model='gpt2'"):
        spm.from_gguf(str(tmp_path / "bpe.gguf"))
