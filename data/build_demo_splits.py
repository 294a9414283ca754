"""Build the demo's two halves of the training split: a small labelled subset and an unlabelled
transfer set (`kd demo` distils where distillation earns its keep: few labels, much text).

    python data/build_demo_splits.py     # writes data/rotten_tomatoes/{labelled,transfer}.parquet

- labelled.parquet: every fifth row of train.parquet (row index % 5 == 0), all columns. Every
  fifth row rather than the first fifth, because rows are grouped by movie: a prefix would hold
  a few dozen movies only.
- transfer.parquet: every other row of train.parquet *without* its `label` column, so that
  nothing downstream can read a label the demo claims to hide.

Deterministic (same input, same polars: byte-identical output); each file is written to a
temporary name beside its target and renamed into place.
"""

import os
import sys
import tempfile
from pathlib import Path

import polars as pl

DIR = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "rotten_tomatoes"
EVERY = 5


def write(df: pl.DataFrame, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        df.write_parquet(tmp, compression="zstd", compression_level=19)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the data from other users
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


train = pl.read_parquet(DIR / "train.parquet").with_row_index("i")
labelled = train.filter(pl.col("i") % EVERY == 0).drop("i")
transfer = train.filter(pl.col("i") % EVERY != 0).drop("i", "label")
write(labelled, DIR / "labelled.parquet")
write(transfer, DIR / "transfer.parquet")
fresh = labelled["label"].sum()
print(f"labelled.parquet: {len(labelled)} rows ({fresh} fresh, {len(labelled) - fresh} rotten); "
      f"transfer.parquet: {len(transfer)} rows, no label column")
