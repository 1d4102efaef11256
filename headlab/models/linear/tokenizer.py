"""A byte-level tokenizer (one token per UTF-8 byte, plus BOS) for the text twins: no hub, no training."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

BOS = "<bos>"
N_BYTES = 256


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Token i < 256 is byte i (in GPT-2's byte-to-unicode alphabet); 256 is `<bos>`, prepended to every text."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # order the 256 symbols by the byte they stand for, so token id == byte value
    byte_of = {ch: b for b, ch in _bytes_to_unicode().items()}
    vocab = {ch: byte_of[ch] for ch in alphabet}
    vocab[BOS] = N_BYTES
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, N_BYTES)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, pad_token=BOS, eos_token=BOS)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-unicode map (the alphabet of the ByteLevel pre-tokenizer)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))
