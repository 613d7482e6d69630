"""Tiny random-weight GGUF files for tests, and broken variants of them.

The models are real llama-architecture GGUFs (a few hundred KB) that llama.cpp loads and
decodes from in milliseconds, so lifecycle, batching, eviction and fault tests never need a
big model. The tokenizer is a small SentencePiece ("llama") vocabulary with the 256 byte
tokens, so any text tokenizes (unknown characters fall back to bytes). The weights are
random, so the text they produce is noise: use the real default model where quality matters.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType, PoolingType, TokenType

# write_tiny_llama's arguments for a tiny Qwen3-Reranker: qwen3 architecture, rank pooling, and a
# two-label ("yes", "no") head whose softmax's first value is the score
RERANKER = {"arch": "qwen3", "pooling": "rank", "classifier_labels": ("yes", "no")}

_SPACE = "\u2581"  # SentencePiece's word-start marker "▁"
_WORDS = (
    "the once upon a time there was little girl boy who lived in small house with her his "
    "mother father and dog cat one day she he went to park saw big tree said hello happy "
    "sun sky is it of you we they play run jump red blue green Once The There One She He"
).split()
_CHARS = (
    "abcdefghijklmnopqrstuvwxyz"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "0123456789"
    ".,!?;:'\"-()"
)


def _vocab(control: tuple[str, ...] = ()) -> tuple[list[str], list[float], list[int]]:
    """SPM vocabulary: specials, 256 byte tokens, characters, word-start pieces, then the
    `control` tokens (markers such as "[TOOL_CALLS]" that real vocabularies hold as one token).

    llama.cpp's SPM tokenizer builds tokens by merging adjacent pieces, so every prefix of
    a word piece ("▁t", "▁th", "▁the") is in the vocabulary; longer pieces score higher so
    whole words win.
    """
    tokens = ["<unk>", "<s>", "</s>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    pieces: list[str] = [_SPACE, *_CHARS]
    seen = set(pieces)
    for word in _WORDS:
        marked = _SPACE + word
        for end in range(2, len(marked) + 1):
            piece = marked[:end]
            if piece not in seen:
                seen.add(piece)
                pieces.append(piece)
    tokens += pieces
    types += [TokenType.NORMAL] * len(pieces)
    scores = [0.0] * (3 + 256) + [float(len(p)) - i * 1e-4 for i, p in enumerate(pieces)]
    tokens += control
    types += [TokenType.CONTROL] * len(control)
    scores += [0.0] * len(control)
    return tokens, scores, [int(t) for t in types]


def write_tiny_llama(
    path: str | os.PathLike[str],
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_kv_head: int = 2,
    n_ff: int = 128,
    context_length: int = 512,
    seed: int = 0,
    dtype: str = "f32",
    chat_template: str | None = None,
    name: str = "tiny",
    arch: str = "llama",
    causal: bool = True,
    control_tokens: tuple[str, ...] = (),
    split_max_tensors: int = 0,
    pooling: str | None = None,
    classifier_labels: tuple[str, ...] = (),
    rerank_template: str | None = None,
) -> Path:
    """Write a random-weight llama model that llama.cpp loads; the same args give the same bytes.
    `causal=False` declares bidirectional attention, as encoders (BERT, EmbeddingGemma) do.
    `split_max_tensors` writes a split model, `name-00001-of-0000N.gguf` beside `path`.
    `arch="qwen3"` adds the per-head query and key norms that architecture has; with
    `classifier_labels` (Qwen3-Reranker's are "yes" and "no") and `pooling="rank"` it is a
    reranker, whose `cls.output` head turns the last token's state into one score per label,
    and `rerank_template` is the prompt with {query} and {document} its GGUF may carry."""
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', not {dtype!r}")
    if n_embd % n_head or n_head % n_kv_head:
        raise ValueError("n_embd must divide by n_head and n_head by n_kv_head")
    path = Path(path)
    head_dim = n_embd // n_head
    tokens, scores, token_types = _vocab(control_tokens)
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)
    matrix_dtype = np.float32 if dtype == "f32" else np.float16

    def matrix(rows: int, cols: int) -> np.ndarray:
        # numpy shape (rows, cols) is ggml ne = [cols, rows]: cols is the input dimension.
        return (rng.standard_normal((rows, cols)) * 0.02).astype(matrix_dtype)

    def norm() -> np.ndarray:
        return np.ones(n_embd, dtype=np.float32)  # 1-D tensors stay F32, as converters do

    writer = GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    writer.add_name(name)
    writer.add_file_type(LlamaFileType.ALL_F32 if dtype == "f32" else LlamaFileType.MOSTLY_F16)
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    templates = [{"name": "default", "template": chat_template}] if chat_template is not None else []
    if rerank_template is not None:
        templates.append({"name": "rerank", "template": rerank_template})
    if templates:  # a named template beside the default is tokenizer.chat_template.<name>
        writer.add_chat_template(templates)
    if classifier_labels:
        writer.add_array(f"{arch}.classifier.output_labels", list(classifier_labels))
    if not causal:
        writer.add_causal_attention(False)
    if pooling is not None:  # "mean", "cls", "last" or "rank", as embedding and reranking GGUFs declare
        writer.add_pooling_type(PoolingType[pooling.upper()])

    writer.add_tensor("token_embd.weight", matrix(n_vocab, n_embd))
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.attn_q.weight", matrix(n_head * head_dim, n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", matrix(n_kv_head * head_dim, n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", matrix(n_kv_head * head_dim, n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", matrix(n_embd, n_head * head_dim))
        if arch == "qwen3":
            writer.add_tensor(f"blk.{i}.attn_q_norm.weight", np.ones(head_dim, dtype=np.float32))
            writer.add_tensor(f"blk.{i}.attn_k_norm.weight", np.ones(head_dim, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", matrix(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", matrix(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", matrix(n_embd, n_ff))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", matrix(n_vocab, n_embd))
    if classifier_labels:
        writer.add_tensor("cls.output.weight", matrix(len(classifier_labels), n_embd))

    path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_truncated(src: Path, dst: Path, keep_fraction: float = 0.5) -> Path:
    """Copy the first part of a GGUF, like an interrupted download."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * keep_fraction)])
    return Path(dst)


def write_bad_magic(dst: str | os.PathLike[str]) -> Path:
    """Write a file that is not GGUF at all (it starts like a zip archive)."""
    Path(dst).write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    return Path(dst)


def write_corrupt_header(src: Path, dst: Path) -> Path:
    """Keep the GGUF magic and version but put garbage in the kv count and first key length."""
    data = bytearray(Path(src).read_bytes())
    data[16:24] = (0x00FF_00FF_00FF_00FF).to_bytes(8, "little")  # kv count
    data[24:32] = (0xDEAD_BEEF_DEAD_BEEF).to_bytes(8, "little")  # length of the first key
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def write_fails_mid_load(src: Path, dst: Path) -> Path:
    """A GGUF whose header claims one more layer than it has tensors for: every check of the
    header passes, and llama.cpp fails only while loading the tensors."""
    data = bytearray(src.read_bytes())
    key = b"llama.block_count"
    at = data.index(key) + len(key) + 4  # the key, then its value type (u32), then the value
    data[at:at + 4] = (int.from_bytes(data[at:at + 4], "little") + 1).to_bytes(4, "little")
    dst.write_bytes(bytes(data))
    return dst


def write_wrong_shape(src: Path, dst: Path, tensor: str) -> Path:
    """A GGUF whose tensor table gives `tensor` (a 2-D one) its two dimensions swapped: the
    same size at the same offset, so the header reads well, and llama.cpp refuses the tensor's
    shape only while loading it."""
    data = bytearray(src.read_bytes())
    name = tensor.encode()
    at = data.rindex(len(name).to_bytes(8, "little") + name) + 8 + len(name)  # its entry in the tensor table
    assert int.from_bytes(data[at:at + 4], "little") == 2, f"{tensor} is not 2-D"
    dims = data[at + 4:at + 20]
    data[at + 4:at + 20] = dims[8:] + dims[:8]
    dst.write_bytes(bytes(data))
    return dst


def write_unknown_arch(dst: str | os.PathLike[str]) -> Path:
    """A well-formed GGUF whose general.architecture no llama.cpp knows."""
    return write_tiny_llama(dst, arch="notanarch", name="notanarch")
