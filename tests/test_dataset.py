"""Dataset.open: a prepared folder read back and checked; missing, incomplete or corrupt ones refused."""

import json
import shutil

import numpy as np
import pytest
from data_corpus import make_dataset

from workbench.engine.data.dataset import Dataset
from workbench.engine.data.shards import HEADER_BYTES
from workbench.engine.errors import DataError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds"))


@pytest.fixture
def copy(prepared, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(prepared, dst)
    return dst


def test_open_reads_every_part(prepared):
    ds = Dataset.open(prepared)
    assert ds.path == prepared
    assert ds.meta["vocab_size"] == ds.tokenizer.vocab_size == 320
    assert ds.meta["sha256"] == ds.tokenizer.sha256
    assert ds.train.dtype == np.uint16 and ds.val.dtype == np.uint16
    assert ds.train[0] == ds.tokenizer.bos_id and ds.val[0] == ds.tokenizer.bos_id
    assert ds.token_bytes.dtype == np.int32 and ds.token_bytes.shape == (ds.tokenizer.vocab_size,)
    assert ds.val_docs.dtype == np.int64 and ds.val_docs.shape[1] == 3
    sources = ds.val_sources()
    assert len(sources) == len(ds.val_docs) >= 1
    assert all(set(s) == {"source", "preview"} for s in sources)


def test_val_docs_describe_val_bin_exactly(prepared):
    ds = Dataset.open(prepared)
    # documents tile val.bin, each starts with <|bos|>, and its bytes are its tokens' bytes
    assert ds.val_docs[0, 0] == 0
    assert (ds.val_docs[1:, 0] == ds.val_docs[:-1, 0] + ds.val_docs[:-1, 1]).all()
    assert (ds.val == ds.tokenizer.bos_id).sum() == len(ds.val_docs)
    for (start, count, nbytes), meta in zip(ds.val_docs, ds.val_sources(), strict=True):
        tokens = ds.val[start : start + count]
        assert tokens[0] == ds.tokenizer.bos_id
        assert ds.token_bytes[tokens].sum() == nbytes
        text = ds.tokenizer.decode(tokens)
        assert text.startswith(meta["preview"])
        for special in ds.tokenizer.special_ids:
            text = text.replace(special, "")
        assert len(text.encode("utf-8")) == nbytes


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no prepared dataset"):
        Dataset.open(tmp_path / "nope")


@pytest.mark.parametrize("name", ["train.bin", "tokenizer.model", "val_docs.npy"])
def test_incomplete_folder(copy, name):
    (copy / name).unlink()
    with pytest.raises(DataError, match=f"incomplete: missing {name}"):
        Dataset.open(copy)


def test_truncated_shard(copy):
    data = (copy / "train.bin").read_bytes()
    (copy / "train.bin").write_bytes(data[: len(data) - 7])
    with pytest.raises(DataError, match="truncated or corrupt"):
        Dataset.open(copy)


def test_shard_with_bad_header(copy):
    data = bytearray((copy / "val.bin").read_bytes())
    data[:8] = b"GARBAGE!"
    (copy / "val.bin").write_bytes(bytes(data))
    with pytest.raises(DataError, match="bad header"):
        Dataset.open(copy)


def test_shard_with_ids_outside_vocab(copy):
    data = bytearray((copy / "train.bin").read_bytes())
    data[HEADER_BYTES + 10 : HEADER_BYTES + 12] = (65000).to_bytes(2, "little")
    (copy / "train.bin").write_bytes(bytes(data))
    with pytest.raises(DataError, match="outside the vocabulary"):
        Dataset.open(copy)


def test_tokenizer_json_not_matching_model(copy):
    meta = json.loads((copy / "tokenizer.json").read_text())
    meta["sha256"] = "0" * 64
    (copy / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="does not match"):
        Dataset.open(copy)


def test_corrupt_metadata_files(copy):
    (copy / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        Dataset.open(copy)


def test_val_docs_not_covering_val(copy):
    docs = np.load(copy / "val_docs.npy")
    np.save(copy / "val_docs.npy", docs[:-1] if len(docs) > 1 else docs * 0)
    with pytest.raises(DataError, match="val_docs.npy"):
        Dataset.open(copy)
