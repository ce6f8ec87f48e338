"""Small real models for tests and the demo: a GGUF file, a safetensors directory, a demo Hub.

The files are real enough for the readers that matter (gguf's GGUFReader, safetensors,
transformers' config loading) and deterministic: the same seed gives the same bytes, so
content ids stay stable from run to run. Tensor values are seeded pseudo-random numbers,
not trained weights.
"""

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

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


def _weights(rng, shape, dtype):
    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)


# ---------------------------------------------------------------------------
# GGUF


def _gguf_vocab_size(size_mib):
    """The vocabulary size that makes token_embd + output fill the file to about size_mib."""
    layer_bytes = N_LAYER * 2 * (4 * N_EMBD * N_EMBD + 3 * N_EMBD * N_FF)  # f16
    per_token = 2 * N_EMBD * 2 + 16  # two f16 rows, plus the token's metadata
    return max(512, (size_mib * MIB - layer_bytes) // per_token)


def _gguf_metadata(writer, vocab):
    writer.add_name("tiny-llama")
    writer.add_description("lamina-llm-cache test model: seeded random weights")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(N_EMBD)
    writer.add_feed_forward_length(N_FF)
    writer.add_block_count(N_LAYER)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    _gguf_tokenizer(writer, vocab)


def _gguf_tokenizer(writer, vocab):
    """A llama-style token list: unk/bos/eos, the 256 byte tokens, then filler words."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"tok{i}" for i in range(vocab - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (vocab - 259)  # unknown, control, byte, normal
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(vocab)])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def _gguf_tensors(writer, rng, vocab):
    writer.add_tensor("token_embd.weight", _weights(rng, (vocab, N_EMBD), np.float16))
    for i in range(N_LAYER):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{name}.weight", _weights(rng, (N_EMBD, N_EMBD), np.float16))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", _weights(rng, (N_FF, N_EMBD), np.float16))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", _weights(rng, (N_FF, N_EMBD), np.float16))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", _weights(rng, (N_EMBD, N_FF), np.float16))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("output.weight", _weights(rng, (vocab, N_EMBD), np.float16))


def write_gguf(path, size_mib=24, seed=0):
    """Write a llama-architecture GGUF of about `size_mib` MiB at `path`; returns the Path."""
    import gguf  # only the generator needs it

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vocab = _gguf_vocab_size(size_mib)
    writer = gguf.GGUFWriter(str(path), "llama")
    _gguf_metadata(writer, vocab)
    _gguf_tensors(writer, np.random.default_rng(seed), vocab)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------------------
# safetensors directory


VOCAB = 1024


def _hf_tensors(rng):
    tensors = {"model.embed_tokens.weight": _weights(rng, (VOCAB, N_EMBD), np.float32)}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        tensors[f"model.layers.0.self_attn.{name}.weight"] = _weights(rng, (N_EMBD, N_EMBD), np.float32)
    for name, shape in (("gate_proj", (N_FF, N_EMBD)), ("up_proj", (N_FF, N_EMBD)), ("down_proj", (N_EMBD, N_FF))):
        tensors[f"model.layers.0.mlp.{name}.weight"] = _weights(rng, shape, np.float32)
    tensors["model.layers.0.input_layernorm.weight"] = np.ones(N_EMBD, dtype=np.float32)
    tensors["model.layers.0.post_attention_layernorm.weight"] = np.ones(N_EMBD, dtype=np.float32)
    tensors["model.norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
    tensors["lm_head.weight"] = _weights(rng, (VOCAB, N_EMBD), np.float32)
    return tensors


def _meta_tensors(rng):
    """The same model in Meta's original layout, as repos ship it under `original/`."""
    tensors = {"tok_embeddings.weight": _weights(rng, (VOCAB, N_EMBD), np.float16)}
    for name in ("wq", "wk", "wv", "wo"):
        tensors[f"layers.0.attention.{name}.weight"] = _weights(rng, (N_EMBD, N_EMBD), np.float16)
    tensors["norm.weight"] = np.ones(N_EMBD, dtype=np.float16)
    tensors["output.weight"] = _weights(rng, (VOCAB, N_EMBD), np.float16)
    return tensors


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
    from safetensors.numpy import save_file

    directory = Path(directory)
    rng = np.random.default_rng(seed)
    (directory / "original").mkdir(parents=True, exist_ok=True)
    _write_json(directory / "config.json", _hf_config())
    _write_json(directory / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "max_length": 128})
    _write_json(directory / "tokenizer.json", _tokenizer_json())
    _write_json(directory / "original" / "params.json",
                {"dim": N_EMBD, "n_layers": 1, "n_heads": N_HEAD, "vocab_size": VOCAB, "norm_eps": 1e-5})
    save_file(_hf_tensors(rng), str(directory / "model.safetensors"), metadata={"format": "pt"})
    save_file(_meta_tensors(rng), str(directory / "original" / "consolidated.safetensors"))
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
