"""Synthetic Qwen2 GGUF models for plano's tests and router benchmark.

Two writers, both with random weights (the numbers mean nothing; the shapes and the tokenizer are
what matter):

- `write_tiny_qwen2_gguf`: a ~0.4 MB Qwen2 model with a byte-level BPE vocabulary and the real
  Qwen2.5 chat template. It loads, tokenizes any text and generates in milliseconds, so the test
  suite can exercise the embedded-router code path without downloading Arch-Router-1.5B.
- `write_arch_router_twin`: a "shape twin" of Arch-Router-1.5B (Qwen2.5-1.5B dimensions, the real
  Qwen BPE vocabulary, Q4_K_M). It costs the same compute per token and yields the same token counts
  as the real model, so latency measured on it is the latency plano will see.

`python -m bench.qwen2_gguf [WORKDIR]` builds both (the twin is cached) and prints a smoke check and
the twin's prompt/decode speed.
"""

from __future__ import annotations

import base64
import ctypes
import dataclasses
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import gguf
import jinja2
import llama_cpp
import llama_cpp.llama_cpp as llama_c
import numpy as np

__all__ = [
    "QWEN25_CHAT_TEMPLATE",
    "fetch_qwen_vocab",
    "write_arch_router_twin",
    "write_tiny_qwen2_gguf",
]

# Qwen2.5-Instruct's `chat_template` (tokenizer_config.json), verbatim. Arch-Router-1.5B's GGUF
# carries the same one. Note the default system block it inserts when the conversation has no
# system message: that block is part of every prompt the router model saw in training.
QWEN25_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# The special tokens that matter to a chat model, in Qwen's order. In the real vocabulary they
# follow the 151643 BPE tokens directly: <|endoftext|>=151643, <|im_start|>=151644, <|im_end|>=151645.
_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclasses.dataclass(frozen=True)
class _Qwen2Shape:
    n_layer: int
    d_model: int
    n_head: int
    n_head_kv: int
    d_ff: int
    n_ctx_train: int = 32768
    rope_theta: float = 1_000_000.0
    rms_eps: float = 1e-6


@dataclasses.dataclass(frozen=True)
class _BpeVocab:
    tokens: list[str]  # in the GPT-2 byte-to-unicode alphabet, indexed by token id
    token_types: list[int]
    merges: list[str]  # "left right", highest priority first
    eos_id: int  # <|im_end|>: a chat turn ends there
    pad_id: int  # <|endoftext|>, as in Qwen2.5's own GGUF conversion


# Qwen2.5-1.5B(-Instruct), which Arch-Router-1.5B fine-tunes (config.json of both). Its input and
# output embeddings are tied, so neither model here has a separate `output.weight` (the real GGUF
# has none either); the embedding matrix has one row per vocabulary entry.
_ARCH_ROUTER_SHAPE = _Qwen2Shape(n_layer=28, d_model=1536, n_head=12, n_head_kv=2, d_ff=8960)
_ARCH_ROUTER_N_VOCAB = 151936  # embedding rows: Qwen pads past its 151665 tokens (151643 BPE + 22 special)
_TINY_SHAPE = _Qwen2Shape(n_layer=2, d_model=64, n_head=4, n_head_kv=2, d_ff=128)


# --------------------------------------------------------------------------------------------------
# Byte-level BPE vocabularies
# --------------------------------------------------------------------------------------------------


def _gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (llama.cpp's "gpt2" tokenizer reads tokens in it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table = {b: chr(b) for b in printable}
    # Whitespace and control bytes are moved past U+00FF so every token is visible, non-space text.
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


# Enough merges to make the tiny vocabulary a real BPE (llama.cpp rejects an empty merge list); each
# pair's halves are bytes or results of earlier merges.
_TINY_MERGES = [
    (" ", "t"), ("h", "e"), (" t", "he"), ("i", "n"), ("in", "g"), ("e", "r"), ("o", "n"), ("r", "e"),
    (" ", "a"), (" ", "s"), (" ", "r"), ("o", "u"), (" r", "ou"), ("t", "e"), (" rou", "te"),
]


def _tiny_vocab() -> _BpeVocab:
    to_unicode = _gpt2_byte_to_unicode()

    def encode(text: str) -> str:
        return "".join(to_unicode[b] for b in text.encode())

    # All 256 bytes are tokens, so any UTF-8 text (emoji, CJK, ...) tokenizes by falling back to bytes.
    tokens = [to_unicode[b] for b in range(256)]
    tokens += [encode(left + right) for left, right in _TINY_MERGES]
    tokens += _SPECIAL_TOKENS
    n_bpe = len(tokens) - len(_SPECIAL_TOKENS)
    return _BpeVocab(
        tokens=tokens,
        token_types=[gguf.TokenType.NORMAL] * n_bpe + [gguf.TokenType.CONTROL] * len(_SPECIAL_TOKENS),
        merges=[f"{encode(left)} {encode(right)}" for left, right in _TINY_MERGES],
        eos_id=n_bpe + 2,
        pad_id=n_bpe,
    )


def _read_tiktoken_ranks(vocab_file: Path) -> dict[bytes, int]:
    """A tiktoken rank file: one `base64(token bytes) rank` per line."""
    ranks = {}
    for line in vocab_file.read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bpe_halves(token: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """Replay byte-pair encoding on `token` using only merges ranked below it.

    tiktoken stores ranks, not merges; a token of rank r was created by merging the two parts that
    BPE has left just before reaching rank r. (The same reconstruction as Hugging Face's tiktoken
    converter.)
    """
    rank_limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, best_rank = None, rank_limit
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best is None:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def _qwen_vocab(vocab_file: Path) -> _BpeVocab:
    ranks = _read_tiktoken_ranks(vocab_file)
    to_unicode = _gpt2_byte_to_unicode()

    def encode(piece: bytes) -> str:
        return "".join(to_unicode[b] for b in piece)

    by_id = sorted(ranks, key=ranks.__getitem__)
    assert [ranks[t] for t in by_id] == list(range(len(by_id))), "ranks must be the token ids 0..n-1"
    merges = []
    for token in by_id:
        if len(token) > 1:
            halves = _bpe_halves(token, ranks)
            if len(halves) == 2:  # every Qwen token qualifies; a token that did not would stay unmerged
                merges.append(f"{encode(halves[0])} {encode(halves[1])}")
    n_bpe = len(by_id)
    # Qwen2.5 defines more special tokens after <|im_end|> (vision, tool-call, FIM markers) that a
    # router never sees; the twin leaves those ids, like the padding rows, as unused placeholders.
    padding = [f"[PAD{i}]" for i in range(n_bpe + len(_SPECIAL_TOKENS), _ARCH_ROUTER_N_VOCAB)]
    return _BpeVocab(
        tokens=[encode(t) for t in by_id] + list(_SPECIAL_TOKENS) + padding,
        token_types=[gguf.TokenType.NORMAL] * n_bpe
        + [gguf.TokenType.CONTROL] * len(_SPECIAL_TOKENS)
        + [gguf.TokenType.UNUSED] * len(padding),
        merges=merges,
        eos_id=n_bpe + 2,
        pad_id=n_bpe,
    )


def fetch_qwen_vocab(cache_dir: str | os.PathLike[str]) -> Path:
    """Return the path of Qwen's BPE rank file (`qwen.tiktoken`), downloading it once.

    The PyPI package `dashscope` ships it as `dashscope/resources/qwen.tiktoken` (151643 ranks, the
    vocabulary of Qwen, Qwen2 and Qwen2.5). Only the wheel is downloaded; nothing is installed.
    """
    cache_dir = Path(cache_dir)
    vocab_file = cache_dir / "qwen.tiktoken"
    if vocab_file.exists():
        return vocab_file
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Pinned: the version checked to ship qwen.tiktoken, so the benchmark's token counts stay reproducible.
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "dashscope==2.0.2", "--dest", str(cache_dir)],
        check=True,
    )
    wheel = next(cache_dir.glob("dashscope-2.0.2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read("dashscope/resources/qwen.tiktoken")
    partial = vocab_file.with_suffix(".part")
    partial.write_bytes(data)
    partial.replace(vocab_file)
    return vocab_file


# --------------------------------------------------------------------------------------------------
# GGUF writing
# --------------------------------------------------------------------------------------------------


def _tensor_shapes(shape: _Qwen2Shape, n_vocab: int) -> dict[str, tuple[int, ...]]:
    """llama.cpp's Qwen2 tensors, numpy (rows, cols) order = (out, in) for matrices."""
    d, d_kv = shape.d_model, shape.d_model // shape.n_head * shape.n_head_kv
    shapes = {"token_embd.weight": (n_vocab, d), "output_norm.weight": (d,)}
    for i in range(shape.n_layer):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (d,),
            f"blk.{i}.attn_q.weight": (d, d),
            f"blk.{i}.attn_q.bias": (d,),
            f"blk.{i}.attn_k.weight": (d_kv, d),
            f"blk.{i}.attn_k.bias": (d_kv,),
            f"blk.{i}.attn_v.weight": (d_kv, d),
            f"blk.{i}.attn_v.bias": (d_kv,),
            f"blk.{i}.attn_output.weight": (d, d),
            f"blk.{i}.ffn_norm.weight": (d,),
            f"blk.{i}.ffn_gate.weight": (shape.d_ff, d),
            f"blk.{i}.ffn_up.weight": (shape.d_ff, d),
            f"blk.{i}.ffn_down.weight": (d, shape.d_ff),
        }
    return shapes


def _storage_dtype(dims: tuple[int, ...], dtype: type) -> np.dtype:
    # 1-D tensors (norm gains, biases) stay F32 as in converted models: llama.cpp applies them in F32
    # and its quantizer leaves them alone.
    return np.dtype(np.float32 if len(dims) == 1 else dtype)


def _random_tensor(name: str, dims: tuple[int, ...], rng: np.random.RandomState, dtype: type) -> np.ndarray:
    if name.endswith("norm.weight"):
        return np.ones(dims, dtype=np.float32)  # RMSNorm gain 1: normalisation only
    # Uniform weights with variance 1/fan_in keep activations O(1) through the layers (no inf/NaN).
    # They are drawn as int16 and scaled because that is ~20x faster than drawing Gaussian floats,
    # which matters for the twin's 1.5e9 weights.
    scale = 0.1 if len(dims) == 1 else np.sqrt(3.0 / dims[-1])
    levels = 1000
    values = rng.randint(-levels, levels + 1, size=dims, dtype=np.int16).astype(_storage_dtype(dims, dtype))
    values *= values.dtype.type(scale / levels)
    return values


def _write_qwen2_gguf(
    path: Path, name: str, shape: _Qwen2Shape, vocab: _BpeVocab, dtype: type, seed: int
) -> None:
    """Write a Qwen2 GGUF, generating and writing one tensor at a time (bounded memory)."""
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == np.float16 else gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.d_model)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.d_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)

    writer.add_tokenizer_model("gpt2")  # byte-level BPE
    writer.add_tokenizer_pre("qwen2")  # Qwen2's pre-tokenizer regex (digits split one by one, ...)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    # As in Qwen2.5-Instruct's GGUF: bos = pad = <|endoftext|>, never prepended; a turn ends at <|im_end|>.
    writer.add_bos_token_id(vocab.pad_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(QWEN25_CHAT_TEMPLATE)

    shapes = _tensor_shapes(shape, len(vocab.tokens))
    # Announce every tensor first (the header holds their offsets), then stream the data in order.
    for tensor_name, dims in shapes.items():
        item_dtype = _storage_dtype(dims, dtype)
        writer.add_tensor_info(tensor_name, dims, item_dtype, int(np.prod(dims)) * item_dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.RandomState(seed)
    for tensor_name, dims in shapes.items():
        writer.write_tensor_data(_random_tensor(tensor_name, dims, rng, dtype))
    writer.close()


def write_tiny_qwen2_gguf(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a tiny random Qwen2 chat model (~0.4 MB, F32) and return its path.

    Byte-level BPE (256 byte tokens + a few merges) plus <|endoftext|>, <|im_start|>, <|im_end|> and
    the Qwen2.5 chat template. The same seed gives the same file, so generations are reproducible.
    """
    path = Path(path)
    _write_qwen2_gguf(path, "plano tiny qwen2 test model", _TINY_SHAPE, _tiny_vocab(), np.float32, seed)
    return path


def write_arch_router_twin(
    path: str | os.PathLike[str], vocab_file: str | os.PathLike[str] | None = None, seed: int = 0
) -> Path:
    """Build (once) a random-weight Q4_K_M model with Arch-Router-1.5B's shapes and vocabulary.

    Same layer dimensions, same Qwen BPE vocabulary (exact token counts), same chat template and
    same quantization as `katanemo/Arch-Router-1.5B.gguf` Q4_K_M, so the compute per token is the
    same (~1 GB file). An existing file at `path` is reused. Building takes 1-2 minutes on 2 cores,
    ~1.7 GB of memory and ~3 GB of temporary disk next to `path` for the F16 intermediate.
    `vocab_file` defaults to `fetch_qwen_vocab(<path's directory>)`.
    """
    path = Path(path)
    if path.exists():
        return path
    vocab_file = Path(vocab_file) if vocab_file else fetch_qwen_vocab(path.parent)
    vocab = _qwen_vocab(vocab_file)
    f16_path = path.with_name(path.name + ".f16.tmp")
    quantized_path = path.with_name(path.name + ".tmp")
    try:
        name = "Arch-Router-1.5B shape twin"
        _write_qwen2_gguf(f16_path, name, _ARCH_ROUTER_SHAPE, vocab, np.float16, seed)
        params = llama_c.llama_model_quantize_default_params()
        params.ftype = llama_c.LLAMA_FTYPE_MOSTLY_Q4_K_M
        params.nthread = os.cpu_count() or 1
        status = llama_c.llama_model_quantize(
            str(f16_path).encode(), str(quantized_path).encode(), ctypes.byref(params)
        )
        if status != 0:
            raise RuntimeError(f"llama_model_quantize failed with status {status}")
        # Rename only when complete, so an interrupted build never leaves a "cached" broken file.
        quantized_path.replace(path)
    finally:
        f16_path.unlink(missing_ok=True)
        quantized_path.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------------------
# Smoke check and benchmark (python -m bench.qwen2_gguf)
# --------------------------------------------------------------------------------------------------

_SAMPLE_TEXT = "Route this: fix the failing test 🚀 in 路由器.py, then explain why — quickly!"


def _load(model_path: Path) -> llama_cpp.Llama:
    """`llama_cpp.Llama` for the benchmark: 4096-token context, 2 threads, no extra buffer types.

    On CPUs with AMX (this machine reports AMX_INT8) llama.cpp moves Q4_K/Q6_K weights into its AMX
    buffer type, whose matmul segfaults on any batch of 2+ tokens (llama.cpp issue #20824). The model
    parameter `use_extra_bufts=False` avoids it, but `Llama()` has no argument for it and builds its
    parameters from `llama_model_default_params()`, so that function is swapped during the load.
    """
    default_params = llama_c.llama_model_default_params

    def params_without_extra_buffer_types():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_c.llama_model_default_params = params_without_extra_buffer_types
    try:
        return llama_cpp.Llama(
            model_path=str(model_path), n_ctx=4096, n_threads=2, n_threads_batch=2, verbose=False
        )
    finally:
        llama_c.llama_model_default_params = default_params


def _last_logits(llm) -> np.ndarray:
    """The logits of the last evaluated token (a view into llama.cpp's buffer, valid until the next eval).

    `Llama.eval` fills `llm.scores` only when the model was loaded with `logits_all=True`.
    """
    return np.ctypeslib.as_array(llama_c.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def _smoke_check(model_path: Path) -> None:
    """Tokenize, apply the chat template from the GGUF metadata, generate a few tokens."""
    llm = _load(model_path)
    tokens = llm.tokenize(_SAMPLE_TEXT.encode(), add_bos=False)
    assert llm.detokenize(tokens).decode() == _SAMPLE_TEXT
    template = jinja2.Environment().from_string(llm.metadata["tokenizer.chat_template"])
    prompt = template.render(messages=[{"role": "user", "content": _SAMPLE_TEXT}], add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    prompt_tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    im_start = llm.tokenize(b"<|im_start|>", add_bos=False, special=True)
    assert len(im_start) == 1 and prompt_tokens.count(im_start[0]) == 3
    reply = llm(prompt, max_tokens=8, temperature=0.0)["choices"][0]["text"]
    print(
        f"{model_path.name}: {len(tokens)} tokens for {len(_SAMPLE_TEXT)} chars of sample text, "
        f"chat prompt {len(prompt_tokens)} tokens, greedy reply {reply!r}"
    )


def _benchmark(model_path: Path, n_prompt: int = 256, n_decode: int = 16) -> None:
    """Prompt-processing speed and per-token decode latency with 2 threads (this machine's cores)."""
    llm = _load(model_path)
    english = "The quick brown fox jumps over the lazy dog while the router decides which model answers. "
    english_tokens = llm.tokenize(english.encode(), add_bos=False)
    chars_per_token = len(english) / len(english_tokens)
    print(f"English: {len(english)} chars -> {len(english_tokens)} tokens ({chars_per_token:.1f} chars/token)")
    prompt = (english_tokens * (n_prompt // len(english_tokens) + 1))[:n_prompt]
    llm.eval(prompt)  # warm-up: the first pass faults the memory-mapped weights in
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prompt_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([int(np.argmax(_last_logits(llm)))])
    decode_seconds = time.perf_counter() - start
    print(
        f"{model_path.name}: prompt {n_prompt} tokens in {prompt_seconds:.2f} s "
        f"({n_prompt / prompt_seconds:.0f} tok/s); decode {1000 * decode_seconds / n_decode:.0f} ms/token"
    )


def main() -> None:
    workdir = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gguf_work")
    workdir.mkdir(parents=True, exist_ok=True)
    _smoke_check(write_tiny_qwen2_gguf(workdir / "tiny-qwen2.gguf"))
    twin = write_arch_router_twin(workdir / "arch-router-twin-Q4_K_M.gguf")
    _smoke_check(twin)
    _benchmark(twin)


if __name__ == "__main__":
    main()
