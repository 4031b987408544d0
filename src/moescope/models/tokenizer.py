"""One offline byte-level tokenizer for tiny, miniature and bundled models (no hub, no merges)."""

from __future__ import annotations

from typing import Any

from moescope.errors import ConfigError


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-character table: the alphabet of the ``tokenizers`` ByteLevel pre-tokenizer
    (also how the report turns byte-level pieces back into text)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs), strict=True))


#: Bytes in the order they enter a small vocabulary: printable ASCII first, then whitespace, then the rest.
_BYTE_PRIORITY = [
    *range(32, 127),
    10,
    9,
    13,
    *(b for b in range(256) if not (32 <= b < 127 or b in (9, 10, 13))),
]


def byte_tokenizer(vocab_size: int = 260, *, pad: bool = True, eos: bool = True) -> Any:
    """A byte-level ``PreTrainedTokenizerFast`` with exactly ``vocab_size`` ids, built offline.

    Ids 0-3 are ``<pad>``, ``<s>`` (BOS, added to every text), ``</s>`` and ``<unk>``; the rest are
    single bytes, printable ASCII first. With ``vocab_size >= 260`` every byte has an id and encoding
    is lossless; smaller vocabularies (tiny test models) map the remaining bytes to ``<unk>``.
    ``pad=False`` / ``eos=False`` leave those tokens unset, to exercise tokenizers that lack them.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    if vocab_size < len(specials) + 95:
        raise ConfigError(
            f"byte_tokenizer: vocab_size must be >= {len(specials) + 95} (printable ASCII), got {vocab_size}"
        )
    table = bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(specials)}
    for b in _BYTE_PRIORITY[: vocab_size - len(specials)]:
        vocab[table[b]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>" if eos else None,
        unk_token="<unk>",
        pad_token="<pad>" if pad else None,
        name_or_path=f"moescope-bytes-{vocab_size}",
    )
