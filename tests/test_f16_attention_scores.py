"""float16 runs of attention scores: the additive mask is stored as float16's minimum, not as -inf.

Scores hold the mask at keys a query cannot see (the model dtype's minimum, about -3.4e38, as transformers adds
it). Cast to float16 that became -inf, so every row holding a masked key was stored non-finite and the analyses
refused the hook; a float32 run of the same scores was finite.
"""

from __future__ import annotations

import numpy as np
from hookpoints.store.catalog import Store

import hookpoints as hp

TEXTS = ["the cat sat on the mat today", "hello", "a b c"]
HOOK = "blocks.0.attn.hook_attn_scores"


def test_float16_scores_keep_the_mask_finite(tiny_model_dir, tmp_path):
    """Every position's scores (pooling none; pooled rows hold no masked key: a key no query sees is 0)."""
    model = hp.load(tiny_model_dir("gpt2"))
    store = Store.open(tmp_path / "store", create=True)
    data = [{"id": f"t{i}", "text": text} for i, text in enumerate(TEXTS)]
    for dtype in ("float32", "float16"):
        hp.record(model, data, store, dtype, hooks=HOOK, pooling="none", dtype=dtype, progress=False)
    with store.query() as session:
        rows = session.sql(
            "SELECT run, example_id, position, finite, activation FROM activations ORDER BY 2, 3, 1"
        ).to_pylist()
    f16, f32 = rows[::2], rows[1::2]
    assert [r["run"] for r in f16] == ["float16"] * len(f16) and [r["run"] for r in f32] == ["float32"] * len(f32)
    assert all(r["finite"] for r in rows)
    wide = np.array([r["activation"] for r in f32])  # [rows, head * keys]
    half = np.array([r["activation"] for r in f16])
    masked = wide <= np.finfo(np.float32).min / 2
    assert masked.any()  # causal and padded keys
    assert np.all(half[masked] == np.finfo(np.float16).min)
    np.testing.assert_allclose(half[~masked], wide[~masked], rtol=2e-3, atol=2e-3)
