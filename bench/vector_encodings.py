"""What one activation value costs the writer's Parquet encoding, per layout a vector column could have.

The run writer is CPU-bound per value (docs/gpu.md, "Where the GPU goals stand"): at GPU speed every Table 1
hook point of a Seamless batch is hundreds of MB per second to encode. This times ``pyarrow.parquet``'s writer
alone (one thread, in memory, zstd level 1, 1,024-row groups, no statistics on the vector) on the same values
in each layout, and reads each file back:

- ``list<int16>``, ``list<float32>``, BYTE_STREAM_SPLIT: float32 runs (and float16 runs of stores before schema
  version 3, IEEE half bit patterns as int16, which Parquet stores as INT32: Delta Lake has no float16 type);
- ``list<float16>`` (Parquet's FLOAT16 logical type): not a Delta type, so not an option for the store;
- ``binary``: one blob of the vector's bytes per row (no list levels, no byte-stream split): what float16 runs
  store since schema version 3 (``activation_f16_bytes``); DuckDB turns no blob into ``FLOAT[]`` by itself, so
  a query session registers a numpy function that does (store/vectors.py).

Values: ``--kind random`` (normal: the worst case for compression) or ``--kind activations`` (the MLP
activations of a random-weight GPT-2 with d_model 256, tiled; built on the fly). Run:
``.venv/bin/python bench/vector_encodings.py [--rows 4096 --width 1024 --kind random]`` (about 30 s).
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def values(kind: str, rows: int, width: int) -> np.ndarray:
    """``[rows, width]`` float32 values (the float16 layouts round them)."""
    rng = np.random.default_rng(0)
    if kind == "random":
        return rng.standard_normal((rows, width)).astype(np.float32)
    import torch
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_layer=2, n_embd=256, n_head=4, n_positions=256, vocab_size=1000)).eval()
    seen = []
    model.h[1].mlp.c_fc.register_forward_hook(lambda m, a, out: seen.append(out.reshape(-1, out.shape[-1])))
    with torch.no_grad():
        model(torch.randint(0, 1000, (max(1, rows * width // (256 * 1024)) + 1, 256)))
    flat = torch.cat(seen).float().numpy().ravel()
    return np.resize(flat, rows * width).reshape(rows, width)


def layouts(data: np.ndarray) -> dict[str, tuple[pa.Table, dict]]:
    rows, width = data.shape
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
    half = data.astype(np.float16)
    bits = half.view(np.int16)
    split = {"use_dictionary": False, "column_encoding": {"v.list.element": "BYTE_STREAM_SPLIT"}}
    plain = {"use_dictionary": False, "column_encoding": {"v": "PLAIN"}}

    def lists(flat: np.ndarray) -> pa.Table:
        return pa.table({"v": pa.ListArray.from_arrays(offsets, pa.array(flat.ravel()))})

    def blobs(array: np.ndarray) -> pa.Table:
        return pa.table({"v": pa.array([row.tobytes() for row in array], pa.binary())})

    return {
        "float16 as list<int16>, BYTE_STREAM_SPLIT (the store before schema 3)": (lists(bits), split),
        "float16 as list<float16> (Parquet FLOAT16; no Delta type)": (lists(half), split),
        "float16 as binary, one blob per vector (the store since schema 3)": (blobs(half), plain),
        "float32 as list<float32>, BYTE_STREAM_SPLIT (the store)": (lists(data), split),
        "float32 as binary, one blob per vector": (blobs(data), plain),
    }


def best_seconds(call, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--kind", choices=("random", "activations"), default="random")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    data = values(args.kind, args.rows, args.width)
    count = data.size
    print(f"{args.rows} vectors x {args.width} values ({args.kind}), zstd 1, best of {args.repeats}, one thread\n")
    print("| layout | write ns/value | read ns/value | bytes/value |")
    print("|---|---:|---:|---:|")
    for name, (table, options) in layouts(data).items():
        sink = io.BytesIO()

        def write(table=table, options=options, sink=sink) -> None:
            sink.seek(0)
            sink.truncate()
            pq.write_table(table, sink, row_group_size=1024, compression="zstd", compression_level=1,
                           write_statistics=False, **options)  # fmt: skip

        written = best_seconds(write, args.repeats)
        payload = sink.getvalue()
        read = best_seconds(lambda payload=payload: pq.read_table(io.BytesIO(payload)), args.repeats)
        assert pq.read_table(io.BytesIO(payload)).num_rows == args.rows
        print(f"| {name} | {written / count * 1e9:.2f} | {read / count * 1e9:.2f} | {len(payload) / count:.2f} |")


if __name__ == "__main__":
    main()
