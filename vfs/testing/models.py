"""Small real models for tests and the demo: a GGUF file, a safetensors directory, a demo Hub.

The files are real enough for the readers that matter (gguf's GGUFReader, llama.cpp,
safetensors, transformers' config loading) and deterministic: the same seed gives the same
bytes, so content ids stay stable from run to run. Tensor values are seeded pseudo-random
numbers of small magnitude, not trained weights.

Written with the standard library alone (both formats are a header and raw little-endian
arrays), so `lamina-llm-cache demo` works after a plain `pip install .`: numpy, gguf and
safetensors are test dependencies, used by the tests to read these files back.
"""

import json
import random
import shutil
import struct
import tempfile
from pathlib import Path

GGUF_NAME = "tiny-llama.Q4_K_M.gguf"
GGUF_REPO = "lamina-demo/tiny-llama-GGUF"
SAFETENSORS_REPO = "lamina-demo/tiny-safetensors"

DEMO_MANIFEST = f"""\
models:
  tiny-llama:
    path: /models/tiny-llama/model.gguf
    backend: llama.cpp
    hf: {GGUF_REPO}
    file: {GGUF_NAME}
  tiny-safetensors:
    path: /models/tiny-safetensors/
    backend: vllm
    hf: {SAFETENSORS_REPO}
"""

# One small llama-shaped geometry shared by both formats.
N_EMBD, N_FF, N_HEAD, N_LAYER, CONTEXT = 256, 512, 4, 2, 2048
MIB = 1024 * 1024

# ---------------------------------------------------------------------------
# Tensors: (name, shape, dtype, little-endian bytes)

Shape = tuple[int, ...]
F16, F32 = "F16", "F32"
ITEM_SIZE = {F16: 2, F32: 4}
ONE = {F16: struct.pack("<e", 1.0), F32: struct.pack("<f", 1.0)}

# Random bits made small and finite: the byte holding the sign and the exponent's top bits
# keeps its sign and gets a small exponent (f16: about +-0.016 to 0.06; f32: +-0.008 to
# 0.03), so no weight is huge, infinite or NaN, and a tensor is made in a few C-level passes.
_F16_HIGH = bytes((b & 0x80) | ((9 + ((b >> 2) & 1)) << 2) | (b & 0x03) for b in range(256))
_F32_HIGH = bytes((b & 0x80) | 0x3C for b in range(256))


def _ones(shape, dtype):
    return ONE[dtype] * _count(shape)


# random.randbytes takes at most 2**31 - 1 bits at once; a piece this size keeps every
# smaller tensor's bytes what they always were, and a multiple of every item size.
RANDOM_PIECE = 2**28 - 4


def _random_bytes(rng, size):
    return b"".join(rng.randbytes(min(RANDOM_PIECE, size - start)) for start in range(0, size, RANDOM_PIECE))


def _weights(rng, shape, dtype):
    data = bytearray(_random_bytes(rng, _count(shape) * ITEM_SIZE[dtype]))
    step = ITEM_SIZE[dtype]
    high = _F16_HIGH if dtype == F16 else _F32_HIGH
    data[step - 1::step] = data[step - 1::step].translate(high)
    return bytes(data)


def _count(shape):
    count = 1
    for dimension in shape:
        count *= dimension
    return count


# ---------------------------------------------------------------------------
# GGUF (version 3): header, key-values, tensor infos, then the aligned tensor data

GGUF_VERSION = 3
GGUF_ALIGNMENT = 32
_GGML_TYPE = {F32: 0, F16: 1}
UINT32, INT32, FLOAT32, STRING, ARRAY = 4, 5, 6, 8, 9
_SCALAR = {UINT32: "<I", INT32: "<i", FLOAT32: "<f"}


def _gguf_string(text):
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _gguf_value(kind, value):
    return _gguf_string(value) if kind == STRING else struct.pack(_SCALAR[kind], value)


def _gguf_kv(key, kind, value, item_kind=None):
    """One key-value; an ARRAY carries `item_kind` and its items."""
    head = _gguf_string(key) + struct.pack("<I", kind)
    if kind != ARRAY:
        return head + _gguf_value(kind, value)
    items = b"".join(_gguf_value(item_kind, item) for item in value)
    return head + struct.pack("<IQ", item_kind, len(value)) + items


def _padding(length, alignment):
    return b"\0" * (-length % alignment)


def _gguf_vocab_size(size_mib):
    """The vocabulary size that makes token_embd + output fill the file to about size_mib."""
    layer_bytes = N_LAYER * 2 * (4 * N_EMBD * N_EMBD + 3 * N_EMBD * N_FF)  # f16
    per_token = 2 * N_EMBD * 2 + 16  # two f16 rows, plus the token's metadata
    return max(512, (size_mib * MIB - layer_bytes) // per_token)


def _gguf_metadata(vocab):
    arch = "llama"
    return [
        _gguf_kv("general.architecture", STRING, arch),
        _gguf_kv("general.name", STRING, "tiny-llama"),
        _gguf_kv("general.description", STRING, "lamina-llm-cache test model: seeded random weights"),
        _gguf_kv(f"{arch}.context_length", UINT32, CONTEXT),
        _gguf_kv(f"{arch}.embedding_length", UINT32, N_EMBD),
        _gguf_kv(f"{arch}.feed_forward_length", UINT32, N_FF),
        _gguf_kv(f"{arch}.block_count", UINT32, N_LAYER),
        _gguf_kv(f"{arch}.attention.head_count", UINT32, N_HEAD),
        _gguf_kv(f"{arch}.attention.head_count_kv", UINT32, N_HEAD),
        _gguf_kv(f"{arch}.rope.dimension_count", UINT32, N_EMBD // N_HEAD),
        _gguf_kv(f"{arch}.attention.layer_norm_rms_epsilon", FLOAT32, 1e-5),
        _gguf_kv(f"{arch}.vocab_size", UINT32, vocab),
        *_gguf_tokenizer(vocab),
    ]


def _gguf_tokenizer(vocab):
    """A llama-style token list: unk/bos/eos, the 256 byte tokens, then filler words."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"tok{i}" for i in range(vocab - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (vocab - 259)  # unknown, control, byte, normal
    return [
        _gguf_kv("tokenizer.ggml.model", STRING, "llama"),
        _gguf_kv("tokenizer.ggml.tokens", ARRAY, tokens, STRING),
        _gguf_kv("tokenizer.ggml.scores", ARRAY, [-float(i) for i in range(vocab)], FLOAT32),
        _gguf_kv("tokenizer.ggml.token_type", ARRAY, types, INT32),
        _gguf_kv("tokenizer.ggml.bos_token_id", UINT32, 1),
        _gguf_kv("tokenizer.ggml.eos_token_id", UINT32, 2),
    ]


def _gguf_tensors(rng, vocab):
    tensors: list[tuple[str, Shape, str, bytes]] = [("token_embd.weight", (vocab, N_EMBD), F16, _weights(rng, (vocab, N_EMBD), F16))]
    for i in range(N_LAYER):
        tensors.append((f"blk.{i}.attn_norm.weight", (N_EMBD,), F32, _ones((N_EMBD,), F32)))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensors.append((f"blk.{i}.{name}.weight", (N_EMBD, N_EMBD), F16, _weights(rng, (N_EMBD, N_EMBD), F16)))
        tensors.append((f"blk.{i}.ffn_norm.weight", (N_EMBD,), F32, _ones((N_EMBD,), F32)))
        for name, shape in (("ffn_gate", (N_FF, N_EMBD)), ("ffn_up", (N_FF, N_EMBD)), ("ffn_down", (N_EMBD, N_FF))):
            tensors.append((f"blk.{i}.{name}.weight", shape, F16, _weights(rng, shape, F16)))
    tensors.append(("output_norm.weight", (N_EMBD,), F32, _ones((N_EMBD,), F32)))
    tensors.append(("output.weight", (vocab, N_EMBD), F16, _weights(rng, (vocab, N_EMBD), F16)))
    return tensors


def _gguf_tensor_info(name, shape, dtype, offset):
    # GGUF lists dimensions innermost first: a (rows, columns) array is ne = [columns, rows].
    dims = b"".join(struct.pack("<Q", d) for d in reversed(shape))
    return _gguf_string(name) + struct.pack("<I", len(shape)) + dims + struct.pack("<IQ", _GGML_TYPE[dtype], offset)


def write_gguf(path, size_mib=24, seed=0):
    """Write a llama-architecture GGUF of about `size_mib` MiB at `path`; returns the Path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vocab = _gguf_vocab_size(size_mib)
    metadata = _gguf_metadata(vocab)
    tensors = _gguf_tensors(random.Random(seed), vocab)
    infos, offset = [], 0
    for name, shape, dtype, data in tensors:
        infos.append(_gguf_tensor_info(name, shape, dtype, offset))
        offset += len(data) + len(_padding(len(data), GGUF_ALIGNMENT))
    header = b"GGUF" + struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata)) + b"".join(metadata + infos)
    with open(path, "wb") as out:
        out.write(header + _padding(len(header), GGUF_ALIGNMENT))
        for _, _, _, data in tensors:
            out.write(data + _padding(len(data), GGUF_ALIGNMENT))
    return path


# ---------------------------------------------------------------------------
# safetensors directory: an 8-byte header length, a JSON header, the arrays back to back


VOCAB = 1024


def _hf_tensors(rng):
    tensors: dict[str, tuple[Shape, str, bytes]] = {"model.embed_tokens.weight": ((VOCAB, N_EMBD), F32, _weights(rng, (VOCAB, N_EMBD), F32))}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        tensors[f"model.layers.0.self_attn.{name}.weight"] = ((N_EMBD, N_EMBD), F32, _weights(rng, (N_EMBD, N_EMBD), F32))
    for name, shape in (("gate_proj", (N_FF, N_EMBD)), ("up_proj", (N_FF, N_EMBD)), ("down_proj", (N_EMBD, N_FF))):
        tensors[f"model.layers.0.mlp.{name}.weight"] = (shape, F32, _weights(rng, shape, F32))
    for name in ("model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                 "model.norm.weight"):
        tensors[name] = ((N_EMBD,), F32, _ones((N_EMBD,), F32))
    tensors["lm_head.weight"] = ((VOCAB, N_EMBD), F32, _weights(rng, (VOCAB, N_EMBD), F32))
    return tensors


def _meta_tensors(rng):
    """The same model in Meta's original layout, as repos ship it under `original/`."""
    tensors: dict[str, tuple[Shape, str, bytes]] = {"tok_embeddings.weight": ((VOCAB, N_EMBD), F16, _weights(rng, (VOCAB, N_EMBD), F16))}
    for name in ("wq", "wk", "wv", "wo"):
        tensors[f"layers.0.attention.{name}.weight"] = ((N_EMBD, N_EMBD), F16, _weights(rng, (N_EMBD, N_EMBD), F16))
    tensors["norm.weight"] = ((N_EMBD,), F16, _ones((N_EMBD,), F16))
    tensors["output.weight"] = ((VOCAB, N_EMBD), F16, _weights(rng, (VOCAB, N_EMBD), F16))
    return tensors


def write_safetensors(path, tensors, metadata=None):
    """Write `tensors` (name -> (shape, dtype, bytes)) as one safetensors file, in name order."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name in sorted(tensors):
        shape, dtype, data = tensors[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)         # the arrays start 8-byte aligned, as the format's writers do
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        for name in sorted(tensors):
            out.write(tensors[name][2])


def _hf_config():
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": N_EMBD,
        "intermediate_size": N_FF, "num_attention_heads": N_HEAD, "num_key_value_heads": N_HEAD,
        "num_hidden_layers": 1, "vocab_size": VOCAB, "max_position_embeddings": CONTEXT,
        "rms_norm_eps": 1e-5, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": False,
    }


def _tokenizer_json():
    """A valid `tokenizers` WordLevel tokenizer over VOCAB made-up words."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"tok{i}": i for i in range(3, VOCAB)}}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True} for i, t in enumerate(("<unk>", "<s>", "</s>"))
        ],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
        "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }


def _write_json(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_safetensors_dir(directory, seed=0):
    """Write a transformers/vLLM-style model directory (with an `original/` sub-folder)."""
    directory = Path(directory)
    rng = random.Random(seed)
    (directory / "original").mkdir(parents=True, exist_ok=True)
    _write_json(directory / "config.json", _hf_config())
    _write_json(directory / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "max_length": 128})
    _write_json(directory / "tokenizer.json", _tokenizer_json())
    _write_json(directory / "original" / "params.json",
                {"dim": N_EMBD, "n_layers": 1, "n_heads": N_HEAD, "vocab_size": VOCAB, "norm_eps": 1e-5})
    write_safetensors(directory / "model.safetensors", _hf_tensors(rng), metadata={"format": "pt"})
    write_safetensors(directory / "original" / "consolidated.safetensors", _meta_tensors(rng))
    return directory


# ---------------------------------------------------------------------------
# The demo Hub


_README = """\
---
license: apache-2.0
tags: [gguf, lamina-llm-cache-demo]
---
# tiny-llama-GGUF

A tiny llama-architecture GGUF with seeded random weights, generated by
`vfs.testing.models.write_gguf` for lamina-llm-cache's tests and demo.
"""


def demo_simulator(port=0, cdn_port=0):
    """A started HubSimulator serving the two demo repos; its files go when it stops."""
    from .hubsim import HubSimulator, repo_files

    root = Path(tempfile.mkdtemp(prefix="lamina-demo-"))
    sim = HubSimulator(port=port, cdn_port=cdn_port)
    sim.add_cleanup(lambda: shutil.rmtree(root, ignore_errors=True))
    try:
        write_gguf(root / "gguf" / GGUF_NAME)
        (root / "gguf" / "README.md").write_text(_README)
        write_safetensors_dir(root / "safetensors")
        sim.add_repo(GGUF_REPO, files=repo_files(root / "gguf"))
        sim.add_repo(SAFETENSORS_REPO, files=repo_files(root / "safetensors"))
        return sim.start()
    except BaseException:
        sim.stop()
        raise
