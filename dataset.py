"""Tokenize a text dataset with the GPT-2 BPE into `.npy` shards of uint16 tokens.

    uv run dataset.py                                  # facebook/natural_reasoning from the Hub
    HF_DATASET_NAME=demo uv run dataset.py             # the offline demo corpus
    HF_DATASET_NAME=input.txt DATASET_PATH=/tmp/shakespeare uv run dataset.py

Documents are shuffled with a fixed seed (ordered sources give periodic loss curves), each one is
preceded by <|endoftext|> as in GPT-2's training, and the token stream is cut into shards of
exactly SHARD_SIZE tokens, `val_000000.npy` then `train_000000.npy`, `train_000001.npy`, ...
The val split is the first documents, as in build-nanogpt's fineweb.py: as many whole documents as
fit in one shard. When no shard fills up (the data holds less than about two shards), val is
instead the first VAL_FRACTION of the documents (at least one), so that neither split is empty.

Memory stays bounded whatever the dataset's size: documents stream from `datasets`' on-disk Arrow
files in batches, threads tokenize them (tiktoken releases the GIL), and each split fills one
shard-sized buffer at a time. A dataset is built in a temporary sibling folder and swapped in only
when complete; meta.json, written last, lists its shards (see shards.py).
"""

import os
import re
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

import hub
from atomic import atomic_write
from documents import qa_document
from env import UserError, cli, reason
from settings import DataConfig
from shards import META, read_meta, shard_name, write_meta
from tokenizer import EOT, get_encoding

SHUFFLE_SEED = 1337
VAL_FRACTION = 0.05  # of the documents, for data under two shards
BATCH_DOCUMENTS = 512  # documents per tokenizer task
EOT_ARRAY = np.array([EOT], dtype=np.uint32)
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
# what a half-written dataset holds: shards, and atomic_write's temporaries (NAME.tmpPID)
OUR_FILES = re.compile(r"(train|val)_\d{6}\.npy(\.tmp\d*)?|meta\.json\.tmp\d*")
OFFLINE_HINT = ("set HF_DATASET_NAME=demo for the offline demo corpus, or HF_DATASET_NAME to a local file "
                "(.jsonl, .json, .parquet, .csv, .txt) or a folder saved with datasets' save_to_disk")


# ----------------------------------------------------------------------------------------------
# where the documents come from


def resolve_source(name):
    """Return (kind, source) for HF_DATASET_NAME: `demo`, then an existing local path, then a Hub id."""
    if name == "demo":
        return "demo", "demo"
    path = os.path.abspath(os.path.expanduser(name))
    if os.path.isdir(path):
        return "disk", path
    if os.path.isfile(path):
        if os.path.splitext(path)[1].lower() not in LOCAL_FORMATS:
            raise UserError(f"HF_DATASET_NAME={name}: unsupported file type; use one of {', '.join(LOCAL_FORMATS)}")
        return "file", path
    looks_local = name.startswith((".", "/", "~")) or os.path.splitext(name)[1].lower() in LOCAL_FORMATS
    if looks_local or name.count("/") > 1:
        raise UserError(f"HF_DATASET_NAME={name}: no such file or folder")
    return "hub", name


def load_records(kind, source, cache_dir):
    """Load the raw records as a `datasets.Dataset`, memory-mapped from Arrow files on disk."""
    import datasets  # slow to import: only when a dataset is actually built

    if kind != "hub":  # local data loads in seconds: our own progress bar and errors suffice
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    if kind == "demo":
        import demo_corpus
        return datasets.Dataset.from_generator(demo_corpus.rows, cache_dir=cache_dir)
    if kind == "hub":
        hub.require(f"the dataset {source}", OFFLINE_HINT)
        try:
            return _train_split(datasets.load_dataset(source), source)
        except datasets.exceptions.DatasetNotFoundError:
            raise UserError(f"HF_DATASET_NAME={source}: no such dataset on the Hugging Face Hub, "
                            f"and no such local file") from None
        except OSError as error:  # network failures, a gated dataset without a login, ...
            raise UserError(f"downloading {source} failed ({reason(error)}); {OFFLINE_HINT}") from None
        except ValueError as error:  # e.g. a dataset with several configurations
            raise UserError(f"cannot load {source} from the Hub: {reason(error)}") from None
    if kind == "file" and os.path.getsize(source) == 0:
        raise UserError(f"{source} is empty")
    try:
        if kind == "disk":
            return _train_split(datasets.load_from_disk(source), source)
        builder = LOCAL_FORMATS[os.path.splitext(source)[1].lower()]
        # .txt: one document per paragraph; text and JSON read in 1 MB chunks, as datasets' larger
        # default chunks only raise the peak memory
        options = {"text": {"sample_by": "paragraph", "chunksize": 1 << 20}, "json": {"chunksize": 1 << 20}}
        return datasets.load_dataset(builder, data_files=source, split="train", cache_dir=cache_dir,
                                     **options.get(builder, {}))
    except FileNotFoundError:
        raise UserError(f"{source} is a folder but not a dataset saved with datasets' save_to_disk") from None
    except Exception as error:  # whatever the parser raises: the file is not what its name says
        raise UserError(f"cannot read {source}: {reason(error.__cause__ or error)}") from None


def _train_split(loaded, source):
    """Return a DatasetDict's `train` split (or its only one), and a Dataset as it is."""
    if not hasattr(loaded, "keys"):
        return loaded
    if "train" in loaded:
        return loaded["train"]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise UserError(f"{source} has splits {sorted(loaded)} and none is called 'train'")


def qa_documents(batch):
    """Turn a batch of natural_reasoning rows into question-and-answer documents, the answer being
    the first response's text, else the reference answer. Rows with no question or no answer are skipped."""
    n = len(batch["question"])
    responses = batch.get("responses", [None] * n)
    references = batch.get("reference_answer", [None] * n)
    documents = []
    for question, response, reference in zip(batch["question"], responses, references):
        answer = (response[0].get("response") if response else None) or reference
        if question and answer:
            documents.append(qa_document(question, answer))
    return documents


def text_documents(batch):
    """Return the `text` column's documents, skipping empty ones (a blank-only paragraph, a null)."""
    return [text for text in batch["text"] if text and not text.isspace()]


def documents_reader(records, source):
    """Return (columns to read, batch -> documents) for these records; raise a UserError naming
    the columns when they hold neither natural_reasoning's rows nor a `text` column."""
    features = records.features
    columns = set(features)
    if "question" in columns and columns & {"responses", "reference_answer"}:
        wanted = ["question"] + sorted(columns & {"responses", "reference_answer"})
        checks, to_documents = ["question", "reference_answer"], qa_documents
    elif "text" in columns:
        wanted, checks, to_documents = ["text"], ["text"], text_documents
    else:
        raise UserError(f"{source} has columns {sorted(columns)}: expected natural_reasoning's "
                        f"(question, reference_answer, responses) or a `text` column")
    for column in columns & set(checks):
        dtype = getattr(features[column], "dtype", None)
        if dtype not in ("string", "large_string", "null"):
            raise UserError(f"{source}: column `{column}` must hold text, found {features[column]}")
    return wanted, to_documents


# ----------------------------------------------------------------------------------------------
# tokenizing in parallel


def tokenize(texts):
    """Tokenize one batch of documents into uint16 tokens, each document preceded by <|endoftext|>.

    encode_to_numpy with no special token allowed gives exactly encode_ordinary's tokens (a
    literal "<|endoftext|>" in a document is text, so EOT appears only as the separator and
    counting EOTs counts documents), as a numpy buffer instead of a Python list: a thread holds
    the GIL for a moment per document rather than for every token."""
    if not texts:
        return np.empty(0, dtype=np.uint16)
    encoding = get_encoding()
    parts = []
    for text in texts:
        parts.append(EOT_ARRAY)
        parts.append(encoding.encode_to_numpy(text, disallowed_special=()))
    return np.concatenate(parts, dtype=np.uint16, casting="unsafe")  # ids < 50257 fit in uint16


def default_threads():
    """Return how many CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def tokenized_batches(text_batches, threads=None):
    """Tokenize batches of documents on `threads` threads, yielding uint16 arrays in order.

    tiktoken's BPE runs without the GIL, so threads use every core with none of a process pool's
    pickling; only a few batches are in flight at a time, which bounds memory."""
    threads = threads or default_threads()
    with ThreadPoolExecutor(threads) as pool:
        pending = deque()
        for texts in text_batches:
            pending.append(pool.submit(tokenize, texts))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ----------------------------------------------------------------------------------------------
# writing shards


class SplitWriter:
    """Cuts one split's token stream into shards of exactly shard_size tokens (the last shorter),
    through one shard-sized buffer; each shard is written whole or not at all (atomic_write)."""

    def __init__(self, folder, split, shard_size):
        self.folder, self.split = folder, split
        self.buffer, self.fill = np.empty(shard_size, dtype=np.uint16), 0
        self.shards, self.tokens, self.documents = [], 0, 0

    def add(self, tokens):
        self.tokens += len(tokens)
        self.documents += int(np.count_nonzero(tokens == EOT))
        while len(tokens):
            take = min(len(tokens), len(self.buffer) - self.fill)
            self.buffer[self.fill:self.fill + take] = tokens[:take]
            self.fill += take
            tokens = tokens[take:]
            if self.fill == len(self.buffer):
                self._write()

    def finish(self):
        if self.fill:
            self._write()
        return {"shards": self.shards, "tokens": self.tokens, "documents": self.documents}

    def _write(self):
        name = shard_name(self.split, len(self.shards))
        path = os.path.join(self.folder, name)
        with atomic_write(path) as f:
            np.save(f, self.buffer[:self.fill])
        self.shards.append(name)
        self.fill = 0


def split_at_document(tokens, documents):
    """Split a token array into its first `documents` documents and the rest."""
    starts = np.flatnonzero(tokens == EOT)
    cut = starts[documents] if documents < len(starts) else len(tokens)
    return tokens[:cut], tokens[cut:]


def write_shards(token_batches, folder, shard_size, progress=None):
    """Write val/train shards from a stream of token batches; return meta's `splits`.

    val takes the first whole documents that fit in one shard (at least one), train the rest.
    If no shard fills up (under two shards of data), nothing has been written yet and both
    splits still sit in their buffers: val is re-cut to VAL_FRACTION of the documents."""
    val = SplitWriter(folder, "val", shard_size)
    train = SplitWriter(folder, "train", shard_size)
    val_open = True
    for tokens in token_batches:
        if progress is not None:
            progress.update(len(tokens))
        if val_open:
            ends = np.append(np.flatnonzero(tokens == EOT)[1:], len(tokens))
            fit = int(np.searchsorted(ends, shard_size - val.tokens, side="right"))
            if val.documents == 0:
                fit = max(fit, 1)
            val_open = fit == len(ends)
            head, tokens = split_at_document(tokens, fit)
            val.add(head)
        train.add(tokens)
    documents = val.documents + train.documents
    if documents < 2:
        raise UserError(f"the dataset has {documents} non-empty document(s): at least 2 are needed "
                        f"to make a train and a val split")
    if not val.shards and not train.shards:
        stream = np.concatenate([val.buffer[:val.fill], train.buffer[:train.fill]])
        head, rest = split_at_document(stream, max(1, round(VAL_FRACTION * documents)))
        val, train = SplitWriter(folder, "val", shard_size), SplitWriter(folder, "train", shard_size)
        val.add(head)
        train.add(rest)
    return {"val": val.finish(), "train": train.finish()}


# ----------------------------------------------------------------------------------------------
# building a dataset folder


def shuffled_batches(records, batch_size, seed):
    """Yield batches of records in the order datasets' shuffle(seed) gives, read straight from the
    memory-mapped Arrow files. The order is a permutation of 4 bytes a record, where shuffle()
    would build a much larger index table in memory: the peak that grew with the data."""
    order = np.arange(len(records), dtype=np.uint32 if len(records) < 2**32 else np.uint64)
    np.random.default_rng(seed).shuffle(order)  # the same permutation as default_rng(seed).permutation
    for start in range(0, len(order), batch_size):
        yield records[order[start:start + batch_size]]


def check_replaceable(dataset_path):
    """Raise a UserError unless dataset_path may be rebuilt from scratch. A folder without meta.json
    is a half-written dataset, but it is replaced only if it holds nothing but our own files, so
    that a mistyped DATASET_PATH never deletes user data."""
    if not os.path.exists(dataset_path):
        return
    if not os.path.isdir(dataset_path):
        raise UserError(f"DATASET_PATH={dataset_path} is a file, not a folder")
    for entry in os.listdir(dataset_path):
        if not OUR_FILES.fullmatch(entry):
            raise UserError(f"DATASET_PATH={dataset_path} holds other files ({entry}) and no {META}: "
                            f"choose an empty or new folder")


def build(source_name, dataset_path, shard_size, force=False):
    """Build (or reuse) the dataset of HF_DATASET_NAME=source_name at dataset_path; return its meta."""
    if shard_size < 1:
        raise UserError(f"SHARD_SIZE must be >= 1, got {shard_size}")
    kind, source = resolve_source(source_name)
    dataset_path = os.path.abspath(dataset_path)
    if not os.path.isfile(os.path.join(dataset_path, META)):
        check_replaceable(dataset_path)
    elif not force:
        existing = read_meta(dataset_path)
        if tuple(existing.get(key) for key in ("source", "tokenizer", "shard_size")) == (source, "gpt2", shard_size):
            print(f"{dataset_path} already holds this dataset ({source}, SHARD_SIZE={shard_size}): reusing it")
            return existing
        raise UserError(f"{dataset_path} holds a different dataset (source {existing.get('source')}, "
                        f"SHARD_SIZE={existing.get('shard_size')}): set FORCE=1 to replace it, or choose "
                        f"another DATASET_PATH")

    # build next to the target, swap in when complete: an existing dataset survives any failure
    building = os.path.join(os.path.dirname(dataset_path), f".{os.path.basename(dataset_path)}.building")
    try:
        shutil.rmtree(building, ignore_errors=True)  # left by an interrupted run
        os.makedirs(building)
    except OSError as error:
        raise UserError(f"cannot write DATASET_PATH={dataset_path}: {error.strerror}") from None
    try:
        records = load_records(kind, source, cache_dir=os.path.join(building, "cache"))
        columns, to_documents = documents_reader(records, source)
        if len(records) < 2:
            raise UserError(f"{source} holds {len(records)} record(s): at least 2 are needed for a train and a val split")
        records = records.select_columns(columns)
        texts = (to_documents(batch) for batch in shuffled_batches(records, BATCH_DOCUMENTS, SHUFFLE_SEED))
        get_encoding()  # built before the progress bar starts, so that it shows tokenizing speed
        with tqdm(unit="tok", unit_scale=True, desc=f"tokenizing {len(records):,} records") as progress:
            splits = write_shards(tokenized_batches(texts), building, shard_size, progress)
        del records  # release the memory-mapped Arrow files before deleting them
        shutil.rmtree(os.path.join(building, "cache"), ignore_errors=True)
        meta = {"source": source, "tokenizer": "gpt2", "dtype": "uint16", "eot": EOT,
                "shard_size": shard_size, "shuffle_seed": SHUFFLE_SEED, "splits": splits}
        write_meta(building, meta)
        replace(building, dataset_path)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return meta


def replace(building, dataset_path):
    """Swap the finished folder in, then delete the old one."""
    old = building + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(dataset_path):
        os.replace(dataset_path, old)
    os.replace(building, dataset_path)
    shutil.rmtree(old, ignore_errors=True)


@cli
def main():
    config = DataConfig.from_env()
    print("Configuration from environment:")
    print(f"  HF_DATASET_NAME={config.hf_dataset_name} DATASET_PATH={config.dataset_path} "
          f"SHARD_SIZE={config.shard_size:,} FORCE={int(config.force)}")
    meta = build(config.hf_dataset_name, config.dataset_path, config.shard_size, config.force)
    for split in ("train", "val"):
        info = meta["splits"][split]
        print(f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens in {len(info['shards'])} shard(s)")
    print(f"dataset ready at {config.dataset_path}")


if __name__ == "__main__":
    main()
