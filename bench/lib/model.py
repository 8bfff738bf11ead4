"""The synthetic model: two incompressible safetensors shards plus small JSON files.

Shards are written from os.urandom in 8 MiB chunks, never whole in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHUNK = 8 << 20
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
SMALL = ("config.json", "generation_config.json", "tokenizer.json")


def _small_files() -> dict[str, bytes]:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_attention_heads": 32,
        "num_hidden_layers": 22,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "torch_dtype": "bfloat16",
    }
    generation = {"bos_token_id": 1, "eos_token_id": 2, "max_length": 2048}
    # A tokenizer of realistic size (~1 MiB of JSON).
    vocab = {f"tok{i:05d}_{os.urandom(4).hex()}": i for i in range(32000)}
    tokenizer = {"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": []}}
    return {
        "config.json": json.dumps(config, indent=2).encode(),
        "generation_config.json": json.dumps(generation, indent=2).encode(),
        "tokenizer.json": json.dumps(tokenizer).encode(),
    }


def make_model(directory: Path, size_mib: int) -> dict[str, int]:
    """Write the model into ``directory``; returns {file name: size}. The shards share
    ``size_mib`` MiB minus what the small files take, split evenly."""
    directory.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    small = _small_files()
    for name, body in small.items():
        (directory / name).write_bytes(body)
        sizes[name] = len(body)
    total = size_mib << 20
    shard_total = max(2, total - sum(sizes.values()))
    shard_sizes = [shard_total // 2, shard_total - shard_total // 2]
    for name, size in zip(SHARDS, shard_sizes, strict=True):
        with open(directory / name, "wb") as f:
            left = size
            while left:
                n = min(CHUNK, left)
                f.write(os.urandom(n))
                left -= n
        sizes[name] = size
    return sizes


def write_random(path: Path, size: int) -> str:
    """``size`` bytes from os.urandom (8 MiB chunks, never whole in memory); returns the digest."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(CHUNK, left))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return "sha256:" + h.hexdigest()
