"""Numerical edges a real dataset hits, each checked against an independent computation (numpy by hand,
sklearn, scipy): float16 storage near its range, per-step pooling of float16 rows, ties and degenerate label
sets, degenerate clusters."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from hookpoints.analyses.examples import open_runs, select_examples
from hookpoints.analyses.hook_matrix import HookMatrixReader, shared_hooks
from hookpoints.store.catalog import Store
from hookpoints.store.writer import HookRows, open_run
from selectivity_helpers import examples_table, hook_rows


def _per_step_float16_run(store: Store, examples: pa.Table, decoder: np.ndarray) -> None:
    """A float16 run with mean pooling kept per step: ``decoder`` ``[examples, steps, 4]`` at one decoder hook."""
    hooks = hook_rows("text_decoder", 1, {"ffn.fc1": 4}, layer_output=False)
    hooks[0]["space"] = "decoder"
    ids = examples["example_id"].to_pylist()
    steps = decoder.shape[1]
    settings = {"model": "synthetic", "task": "t2tt", "pooling": "mean+steps", "dtype": "float16"}
    writer = open_run(store, "steps", settings=settings, config={}, hooks=hooks, examples_schema=examples.schema)
    step_ids = [i for i in ids for _ in range(steps)]
    positions = np.tile(np.arange(steps, dtype=np.int32), len(ids))
    writer.add(examples, {hooks[0]["hook"]: HookRows(step_ids, decoder.reshape(-1, 4), positions)})
    writer.finish()


def test_per_step_float16_rows_are_averaged_in_float32_not_half(tmp_path):
    """The steps of a float16 run were summed in float16 before dividing: 40 steps of 3,000 (each stored
    exactly) summed past 65,504 to inf, so ap refused the hook as holding infinite activations and clusters
    had inf rows; smaller sums were rounded to half precision (2048 and 39 x 0.1 gave 51.3, not 51.2975).
    The reference: numpy's float64 mean of the stored half values."""
    store = Store.open(tmp_path / "store", create=True)
    examples = examples_table(1, "text", seed=3)  # 3 examples
    decoder = np.full((3, 40, 4), 3000.0, np.float32)  # [examples, steps, neurons]
    decoder[1] = 0.1
    decoder[1, 0] = 2048.0
    decoder[2] = np.random.default_rng(0).normal(size=(40, 4)) * 500
    _per_step_float16_run(store, examples, decoder)
    with store.query() as session:
        group = open_runs(session, ["steps"])
        chosen = select_examples(session, group)
        hooks = shared_hooks(session, group.runs)
    got = HookMatrixReader(store, chosen).read(hooks[0])  # [examples, neurons], rows in example_id order
    order = np.argsort(examples["example_id"].to_pylist())
    expected = decoder.astype(np.float16).astype(np.float64).mean(axis=1)[order]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_davies_bouldin_of_float32_points_is_computed_in_float64():
    """docs/clusters.md: measures in float64. Davies-Bouldin summed each block of 4,096 float32 rows in float32
    (a float32 sparse product), so on a layer with a large common offset (a residual stream) the centroids were
    off by 1.6e-4 and the stored centroid distances by 5e-4 (relative); the index by 1e-4. The reference:
    numpy by hand (and scikit-learn) in float64 over the same float32 values; centroid distances from direct
    differences (the squared-norm form loses digits between close centroids with large norms)."""
    from hookpoints.analyses.cluster_measures import centroid_stats
    from sklearn.metrics import davies_bouldin_score

    rng = np.random.default_rng(0)
    n, d, k = 20000, 32, 4
    codes = rng.integers(0, k, n)
    x = (300 + rng.normal(size=(n, d)) + 0.05 * codes[:, None] * rng.normal(size=(1, d))).astype(np.float32)
    x64 = x.astype(np.float64)
    stats = centroid_stats(x, codes)
    centroids = np.stack([x64[codes == c].mean(axis=0) for c in range(k)])
    np.testing.assert_allclose(stats.centroids, centroids, rtol=1e-12)
    between = np.linalg.norm(centroids[:, None] - centroids[None], axis=2)  # [k, k] by hand, no cancellation
    np.testing.assert_allclose(stats.distances, between, rtol=1e-12)
    spread = np.array([np.linalg.norm(x64[codes == c] - centroids[c], axis=1).mean() for c in range(k)])
    ratios = (spread[:, None] + spread[None]) / np.where(between == 0, np.inf, between)
    assert stats.davies_bouldin == pytest.approx(ratios.max(axis=1).mean(), rel=1e-12)
    assert stats.davies_bouldin == pytest.approx(davies_bouldin_score(x64, codes), rel=1e-7)  # its own rounding


def test_tsne_of_a_layer_whose_examples_all_hold_one_vector_is_the_origin():
    """A layer whose sampled examples all hold the same vector (a dead or constant hook point, the same text
    recorded under every id), or differ by 1e-30: scikit-learn's PCA initialisation divides by a zero spread
    and its Barnes-Hut t-SNE then crashed the process (SIGSEGV) in `hookpoints clusters`. The map is now every
    point at the origin, so its silhouette and Davies-Bouldin are 0, as scikit-learn gives for the identical
    original points. Run in a child process, since the old code killed its interpreter."""
    import subprocess
    import sys

    for points in ("np.full((40, 8), 0.5, np.float32)", "np.zeros((40, 8), np.float32) + np.eye(40, 8) * 1e-30"):
        code = (
            "import numpy as np\n"
            "from hookpoints.analyses.clusters import tsne_map\n"
            f"m = tsne_map({points}, 5, 0)\n"
            "print(m.shape, np.abs(m).max())\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-500:]  # -11 (SIGSEGV) before
        assert done.stdout.split() == ["(40,", "2)", "0.0"]
    from hookpoints.analyses.cluster_measures import centroid_stats, silhouettes
    from sklearn.metrics import davies_bouldin_score, silhouette_score

    codes = np.repeat([0, 1], 20)
    same = np.full((40, 8), 0.5)
    origin = np.zeros((40, 2))
    assert silhouettes(origin, [codes])[0].silhouette == silhouette_score(same, codes) == 0.0
    assert centroid_stats(origin, codes).davies_bouldin == davies_bouldin_score(same, codes) == 0.0


def test_record_says_which_hooks_overflowed_float16(tiny_model_dir, write_manifest, tmp_path, run_cli):
    """`record --dtype float16` of a hook whose pooled values pass 65,504 stored them as inf (flagged
    `finite = false`) without a word; the first anyone heard of it was ap refusing the hook, whose advice
    ("record the run again") gives the same inf. The reference: numpy's float16 cast of the float32 recording."""
    import transformers as tf

    folder = tmp_path / "loud"
    model = tf.GPT2LMHeadModel.from_pretrained(tiny_model_dir("gpt2"))
    model.transformer.wte.weight.data += 1e5  # embeddings beyond float16's range (the layer norm brings them back)
    model.save_pretrained(folder)
    tf.AutoTokenizer.from_pretrained(tiny_model_dir("gpt2")).save_pretrained(folder)
    manifest = write_manifest([{"id": f"x{i}", "text": f"some words {i}"} for i in range(3)])
    runs = {}
    for dtype in ("float32", "float16"):
        args = ["record", "--model", str(folder), "--data", str(manifest), "--store", str(tmp_path / "s")]
        args += ["--run", dtype, "--dtype", dtype, "--hooks", "blocks.0.hook_resid_pre", "--hooks", "blocks.0.ln1.*"]
        runs[dtype] = run_cli(*args)
        assert runs[dtype][0] == 0, runs[dtype]
    with Store.open(tmp_path / "s").query() as session:
        query = "SELECT activation FROM activations WHERE run = 'float32' AND hook = 'blocks.0.hook_resid_pre'"
        exact = np.array(session.sql(query)["activation"].to_pylist(), np.float32)
    with np.errstate(over="ignore"):
        overflowed = int((~np.isfinite(exact.astype(np.float16))).any(axis=1).sum())
    assert overflowed == 3 and np.isfinite(exact).all()
    note = " ".join(runs["float16"][2].split())
    assert "note: 1 hook point(s) of run float16 store vectors holding NaN or inf (finite = false): " in note
    assert "finite = false): blocks.0.hook_resid_pre; values beyond float16's range" in note
    assert "--dtype float32" in note
    assert "note:" not in runs["float32"][2]  # nothing to say of the float32 run
    code, _, again = run_cli(*args, "--overwrite")  # args: the float16 run's
    assert code == 0, again
    assert "finite = false): blocks.0.hook_resid_pre;" in " ".join(again.split())  # swapped-in files
    ap = ["ap", "--store", str(tmp_path / "s"), "--positive", "example_id = 'x0'", "--k", "1"]
    ap += ["--hooks", "blocks.0.hook_resid_pre"]
    code, _, refusal = run_cli(*ap, "--run", "float16")
    assert code == 2 and "--dtype float32" in " ".join(refusal.split())  # not "record the run again" alone


def test_tsne_of_a_width_one_hook_is_the_tsne_of_its_points_with_a_zero_column():
    """`--hooks` naming a width-1 hook point (a norm's hook_scale): scikit-learn's PCA start cannot take 2
    components of 1 feature, and clusters ended in "error: ValueError: n_components=2 must be between 0 and
    min(n_samples, n_features)=1". A zero second column keeps every distance: the reference is scikit-learn's
    t-SNE of the points so padded."""
    from hookpoints.analyses.clusters import tsne_map
    from sklearn.manifold import TSNE

    x = np.random.default_rng(0).normal(size=(30, 1)).astype(np.float32)
    got = tsne_map(x, 5, 0)
    padded = np.hstack([x, np.zeros_like(x)])
    tsne = TSNE(n_components=2, perplexity=5, init="pca", learning_rate="auto", random_state=0)
    reference = tsne.fit_transform(padded)
    np.testing.assert_allclose(got, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("padded", [False, True])
def test_mean_pooled_causal_attention_scores_average_the_queries_that_see_each_key(tiny_model_dir, padded):
    """A causal attention's scores hold the mask (-3.4e38) at future keys: their mean over positions was a finite
    -1e37 on the CPU (the matmul's weights scale the mask before summing) and -inf on a GPU, and ap ranked it. The
    mean is over the valid queries that see each key. Reference: q k^T / sqrt(d_head) from plain torch hooks on
    GPT-2's c_attn, averaged by hand over queries i >= j of each example's own tokens."""
    from hookpoints.loading import load

    model = load(str(tiny_model_dir("gpt2")), device="cpu")
    texts = ["some words here and there", "few"] if padded else ["some words here", "more words now"]
    inputs = model.inputs(texts)
    point = model.hook_points.get("blocks.1.attn.hook_attn_scores")
    qkv = []
    attn = model.model.transformer.h[1].attn
    handle = attn.c_attn.register_forward_hook(lambda module, args, out: qkv.append(out.detach()))
    try:
        pooled = model.pooled(inputs, [point], "mean")[point.name]  # [batch, head * keys]
    finally:
        handle.remove()
    heads, d_model = model.model.config.n_head, model.model.config.n_embd
    q, k, _ = qkv[0].split(d_model, dim=2)  # [batch, pos, d_model] each
    d_head = d_model // heads
    q = q.reshape(*q.shape[:2], heads, d_head).transpose(1, 2)  # [batch, head, pos, d_head]
    k = k.reshape(*k.shape[:2], heads, d_head).transpose(1, 2)
    scores = q @ k.transpose(2, 3) / d_head**0.5  # [batch, head, query, key]
    lengths = inputs.masks["input"].sum(1).tolist()
    for example, length in enumerate(lengths):
        want = np.zeros((heads, point.keys), np.float64)
        for j in range(length):
            want[:, j] = scores[example, :, j:length, j].double().mean(-1).numpy()  # queries i >= j
        got = pooled[example].reshape(heads, point.keys).double().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(pooled).all()
