"""The streaming loader: disjoint and complete coverage, deterministic order, exact resume,
flat memory, and the hard labels each task type derives from a shard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import format as fmt
from pipeline import io, manifest
from pipeline.errors import KDError
from pipeline.loader import Collate, ParquetSource, StreamingDataset, merged_order, units, unskipped, verify_shards


def synthetic_table(rows: range, task_type: str, k: int = 4, vocab: int = 50, seed: int = 0) -> pa.Table:
    """Rows of a cache with random payloads (no teacher needed): ids 5..vocab-1, descending values."""
    rng = np.random.default_rng([seed, rows.start])
    cols: dict[str, list] = {n: [] for n in ("row", "id", "text", "input_ids", "labels", "truncated", "positions",
                                            "topk_ids", "topk_logits", "lse")}
    for r in rows:
        n = int(rng.integers(3, 12))
        ids = rng.integers(5, vocab, n).tolist()
        if task_type == "sequence-classification":
            pos, labels, text = [0], int(rng.integers(0, 2)), f"row {r}"
        elif task_type == "token-classification":
            pos = sorted(rng.choice(n, size=max(1, n // 2), replace=False).tolist())
            labels = [int(rng.integers(0, 3)) if p in pos else -100 for p in range(n)]
            text = [f"w{i}" for i in range(n)]
        elif task_type == "masked-lm":
            pos = sorted(rng.choice(n, size=max(1, n // 4), replace=False).tolist())
            labels = [ids[p] if p in pos else -100 for p in range(n)]
            text = f"row {r}"
        else:
            pos, labels, text = list(range(n - 1)), None, f"row {r}"
        width = min(k, 3) if task_type.endswith("classification") else k
        vals = -np.sort(rng.random((len(pos), width)), axis=1)
        cols["row"].append(r)
        cols["id"].append(str(r))
        cols["text"].append(text)
        cols["input_ids"].append(ids)
        cols["labels"].append(labels)
        cols["truncated"].append(False)
        cols["positions"].append(pos)
        cols["topk_ids"].append([rng.choice(vocab if not task_type.endswith("classification") else 3, width,
                                            replace=False).tolist() for _ in pos])
        cols["topk_logits"].append(vals.tolist())
        cols["lse"].append((vals[:, 0] + 2.0).tolist())
    schema = fmt.schema(task_type)
    return pa.Table.from_pydict(cols, schema=schema)


def synthetic_cache(root: Path, n_rows: int, task_type: str = "causal-lm", shards: int = 2, k: int = 4,
                    vocab: int = 50) -> Path:
    """A complete cache directory (shards, task record, manifest) of `n_rows` rows."""
    key = io.sha256_bytes(f"{n_rows}-{task_type}-{k}".encode())
    manifest.write_plan(root, {"kind": "targets", "key": key, "num_tasks": 1, "config": {"max_length": 16},
                               "stats": {"total_rows": n_rows, "top_k": k, "outputs": vocab, "temperature": 1.0,
                                         "task_type": task_type, "value_dtype": "float16"}})
    files = []
    for j in range(shards):
        rows = range(j * n_rows // shards, (j + 1) * n_rows // shards)
        rec = fmt.write_shard(root / "shards" / f"00000-{j:05d}.parquet", synthetic_table(rows, task_type, k, vocab),
                              {"cache_key": key})
        files.append({**rec, "path": f"shards/{rec['path']}"})
    manifest.write_task_record(root, 0, {"files": files, "stats": {"rows": n_rows}})
    manifest.finalize(root)
    return root


def dataset(cache: Path, task_type: str = "causal-lm", **kw) -> StreamingDataset:
    m = manifest.read_manifest(cache)
    source = ParquetSource([cache / f["path"] for f in m["files"]], task_type, "float16", False, m["key"])
    return StreamingDataset(source, Collate(task_type, 0, True), kw.pop("batch_size", 7), **kw)


def rows_of(batches) -> list[int]:
    return [r for b in batches for r in b["rows"].tolist()]


@pytest.fixture
def small_row_groups(monkeypatch):
    monkeypatch.setattr(fmt, "POSITIONS_PER_ROW_GROUP", 64)  # many row groups from little data


@pytest.fixture
def cache(tmp_path, small_row_groups) -> Path:
    return synthetic_cache(tmp_path / "cache", 150)


def test_many_row_groups(cache):
    ds = dataset(cache)
    assert len(ds.source.groups) > 10  # the tests below really shuffle and split row groups


@pytest.mark.parametrize("world,workers", [(1, 0), (3, 0), (2, 2)])
def test_every_row_exactly_once_per_epoch(cache, world, workers):
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            ds = dataset(cache, rank=rank, world_size=world, num_workers=workers, seed=3, buffer_rows=20)
            ds.set_epoch(epoch)
            if workers:
                loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
                batches = list(loader)
            else:
                batches = list(ds)
            assert len(batches) == ds.rank_batches(epoch)[rank]  # the count the trainer plans with
            seen += rows_of(batches)
        assert sorted(seen) == list(range(150))


def test_order_is_a_function_of_seed_and_epoch(cache):
    def order(seed, epoch):
        ds = dataset(cache, seed=seed, buffer_rows=20)
        ds.set_epoch(epoch)
        return rows_of(ds)

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    assert order(1, 0) != list(range(150))  # actually shuffled


def test_no_shuffle_keeps_frozen_order(cache):
    ds = dataset(cache, shuffle=False)
    ds.set_epoch(5)
    assert rows_of(ds) == list(range(150))


def test_skip_replays_the_rest_of_an_epoch_exactly(cache):
    ds = dataset(cache, num_workers=2, seed=4, buffer_rows=10, batch_size=6)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    ds.set_epoch(1)
    full = list(loader)
    counts = ds.consumer_batches(1)
    assert counts[0] != counts[1]  # uneven workers: the interesting case for the merge order
    assert [tuple(b["tag"]) for b in full] == [(w, j) for w, j in merged_order(counts)]
    for skip in (1, 4, len(full) - 1):
        ds.set_epoch(1, skip)
        rest = list(unskipped(iter(loader)))
        assert [tuple(b["tag"]) for b in rest] == [tuple(b["tag"]) for b in full[skip:]]
        assert rows_of(rest) == rows_of(full[skip:])


def test_fewer_row_groups_than_consumers_are_split_by_rows(tmp_path):
    cache = synthetic_cache(tmp_path / "one", 30, shards=1)  # one row group
    assert len(units(dataset(cache).source.groups, 4)) == 4
    seen = []
    for rank in range(4):
        ds = dataset(cache, rank=rank, world_size=4, batch_size=3)
        ds.set_epoch(0)
        part = rows_of(ds)
        assert part
        seen += part
    assert sorted(seen) == list(range(30))


def test_memory_stays_flat_as_the_cache_grows(tmp_path, small_row_groups, monkeypatch):
    """Peak memory while streaming a cache 4x larger stays the same -- one row group plus the
    shuffle buffer, not the cache. Arrow's allocator is sampled after every read and batch;
    numpy's (the decoded blocks) is traced exactly by tracemalloc."""
    import tracemalloc

    monkeypatch.setattr(fmt, "POSITIONS_PER_ROW_GROUP", 1024)

    def peak(n_rows: int) -> tuple[int, int]:
        cache = synthetic_cache(tmp_path / f"c{n_rows}", n_rows, shards=4, k=32, vocab=1000)
        ds = dataset(cache, buffer_rows=64, batch_size=16)
        read = ds.source.read
        arrow = []

        def sampled_read(unit, columns):
            t = read(unit, columns)
            arrow.append(pa.total_allocated_bytes())
            return t

        ds.source.read = sampled_read
        ds.set_epoch(0)
        base = pa.total_allocated_bytes()
        tracemalloc.start()
        try:
            n = 0
            for b in ds:
                arrow.append(pa.total_allocated_bytes())
                n += b["rows"].numel()
                del b
            numpy_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert n == n_rows
        decoded = sum(pq.read_table(f).nbytes for f in sorted((cache / "shards").iterdir()))
        return max(arrow) - base + numpy_peak, decoded

    small, small_size = peak(2000)
    big, big_size = peak(8000)
    assert big_size > 3.5 * small_size
    assert big < 1.3 * small + (1 << 20)
    assert big < big_size / 4


def test_collate_hard_labels_per_task_type():
    for task_type in ("sequence-classification", "token-classification", "masked-lm", "causal-lm"):
        t = synthetic_table(range(6), task_type)
        b = Collate(task_type, pad_id=0, targets=True)(t)
        rows = t.to_pylist()
        want = []
        for r in rows:
            for p in r["positions"]:
                if task_type == "sequence-classification":
                    want.append(r["labels"])
                elif task_type == "causal-lm":
                    want.append(r["input_ids"][p + 1])
                else:
                    want.append(r["labels"][p])
        assert b["hard"].tolist() == want, task_type
        assert b["topk_logits"].dtype == torch.float16 and b["topk_ids"].dtype == torch.int32  # no CPU casts
        assert b["lse"].shape[0] == b["b_idx"].shape[0] == len(want)
        for i, r in enumerate(rows):  # right-padded ids, mask marks the real tokens
            n = len(r["input_ids"])
            assert b["input_ids"][i, :n].tolist() == r["input_ids"]
            assert b["attention_mask"][i].sum() == n


def test_collate_retokenizes_text_with_a_students_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    t = pa.table({"row": [0, 1], "text": ["the film", "a great long story"], "labels": [1, 0],
                  "positions": [[0], [0]], "topk_ids": [[[1, 0]], [[0, 1]]], "topk_logits": [[[0.5, 0.1]], [[0.4, 0.2]]],
                  "lse": [[1.0], [1.0]]})
    b = Collate("sequence-classification", 0, True, tokenizer=tok, max_length=16)(t)
    assert b["input_ids"][1][: b["attention_mask"][1].sum()].tolist() == tok("a great long story")["input_ids"]
    assert b["hard"].tolist() == [1, 0]


def test_verify_shards_names_a_corrupted_shard(tmp_path):
    cache = synthetic_cache(tmp_path / "c", 40)
    m = manifest.read_manifest(cache)
    assert verify_shards(cache, m["files"]) == []
    shard = cache / m["files"][1]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify_shards(cache, m["files"])
    assert len(problems) == 1 and m["files"][1]["path"] in problems[0] and "sha256" in problems[0]


def test_batch_size_must_be_positive(cache):
    with pytest.raises(KDError, match="batch-size"):
        dataset(cache, batch_size=0)


def test_collate_hands_the_grid_lse_of_the_training_temperature(tmp_path):
    """lse_index j > 0: batch["lse"] is column j of lse_grid (the grid's lse at the training T), through
    the streaming path too; a source that needs lse_grid refuses a shard without it."""
    t = synthetic_table(range(30), "causal-lm")
    grid = pa.array([[[v, v + 1.0, v + 2.0] for v in row] for row in t["lse"].to_pylist()],
                    fmt.schema("causal-lm", lse_grid=True).field("lse_grid").type)
    t = t.append_column("lse_grid", grid)
    assert Collate("causal-lm", 0, True).columns(False)[-1] == "lse"
    assert Collate("causal-lm", 0, True, lse_index=2).columns(False)[-1] == "lse_grid"
    flat = np.concatenate([np.asarray(r, dtype=np.float32) for r in t["lse"].to_pylist()])
    for j in (0, 1, 2):
        np.testing.assert_array_equal(Collate("causal-lm", 0, True, lse_index=j)(t)["lse"].numpy(), flat + j)
    with pytest.raises(KDError, match="lse_grid holds 3 temperatures"):
        Collate("causal-lm", 0, True, lse_index=3)(t)
    fmt.write_shard(tmp_path / "g.parquet", t, {"cache_key": "k"})
    fmt.write_shard(tmp_path / "p.parquet", synthetic_table(range(30), "causal-lm"), {"cache_key": "k"})
    source = ParquetSource([tmp_path / "g.parquet"], "causal-lm", "float16", False, "k", lse_grid=True)
    data = StreamingDataset(source, Collate("causal-lm", 0, True, lse_index=1), 7, shuffle=False)
    data.set_epoch(0)
    np.testing.assert_array_equal(np.concatenate([b["lse"].numpy() for b in data]), flat + 1)
    with pytest.raises(KDError, match="column 'lse_grid' is missing"):
        ParquetSource([tmp_path / "p.parquet"], "causal-lm", "float16", False, "k", lse_grid=True)
