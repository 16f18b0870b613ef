"""Look at a tokenized dataset: its first 1000 tokens decoded, and the shards and tokens per split.

    uv run peek_dataset.py                    # the dataset at DATASET_PATH (default natural_reasoning)
    uv run peek_dataset.py /tmp/shakespeare   # or PEEK_DATASET_PATH=/tmp/shakespeare
"""

import sys

from env import UserError, cli, read
from settings import DataConfig
from shards import SPLITS, load_shard, read_meta, shard_paths
from tokenizer import decode

PEEK_TOKENS = 1000


@cli
def main():
    if len(sys.argv) > 2:
        raise UserError("usage: uv run peek_dataset.py [DATASET_PATH]")
    if len(sys.argv) > 1:
        dataset_path = sys.argv[1]
    else:
        config = read(DataConfig, only=["peek_dataset_path", "dataset_path"])
        dataset_path = config.peek_dataset_path or config.dataset_path
    meta = read_meta(dataset_path)
    first = load_shard(shard_paths(dataset_path, "train", meta)[0])
    print(f"first {min(PEEK_TOKENS, len(first))} tokens of {dataset_path}/{meta['splits']['train']['shards'][0]}, decoded:")
    print("-" * 80)
    print(decode(first[:PEEK_TOKENS].tolist()))
    print("-" * 80)
    print(f"source: {meta['source']}, tokenizer: {meta['tokenizer']}, SHARD_SIZE={meta['shard_size']:,}")
    for split in SPLITS:
        info = meta["splits"][split]
        shards = shard_paths(dataset_path, split, meta)
        print(f"{split:>5}: {len(shards)} shard(s), {info['tokens']:,} tokens, {info['documents']:,} documents")


if __name__ == "__main__":
    main()
