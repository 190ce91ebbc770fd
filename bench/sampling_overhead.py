"""What sampled decoding costs per new token: hookpoints' per-example streams against greedy and transformers'
``do_sample``.

hookpoints samples with a last logits processor (hookpoints.sampling.SampledChoice): the warpers, a softmax,
a float64 cumulative sum over the vocabulary and one numpy draw per example, where transformers' ``do_sample``
makes a softmax and one ``torch.multinomial`` from the global generator. Both run once per step over
``[batch, vocab]``, so the vocabulary size sets the cost; the model's size only sets what it is compared with.

Cases (one LLaMA-shaped model from a tiny config, random weights, batch ``--batch``, exactly ``--tokens`` new
tokens; interleaved repeats, this thread's CPU time per new token):

- ``greedy``: ``model.generate(texts, max_new_tokens=N)``;
- ``hookpoints``: the same with ``sampling=hp.Sampling(temperature=0.8, top_p=0.95)``;
- ``hf do_sample``: transformers' ``generate(do_sample=True, temperature=0.8, top_p=0.95)`` on the same inputs
  (no fingerprint hook: a little less than hookpoints' path would do for the same sampling).

Run: ``.venv/bin/python bench/sampling_overhead.py [--vocab 32000 128256] [--repeats 7]``; results in
docs/benchmarks.md ("Sampled decoding").
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import hookpoints as hp


def model_of(vocab: int, hidden: int, layers: int):
    folder = tempfile.mkdtemp()
    sizes = {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
             "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": hidden // 8}  # fmt: skip
    return hp.load(hp.build_tiny("llama", folder, sizes=sizes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32_000, 128_256])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    texts = [f"example {i} " + "a b c d e f " * (i % 3 + 1) for i in range(args.batch)]
    print(f"torch {torch.__version__}, 1 thread; batch {args.batch}, {args.tokens} new tokens, hidden {args.hidden}, "
          f"{args.layers} layers; ms of CPU per new token, median (best) of {args.repeats}")  # fmt: skip
    print("\n| vocabulary | greedy | hookpoints sampling | x greedy | hf do_sample | x greedy |")
    print("|---:|---:|---:|---:|---:|---:|")
    sampling = hp.Sampling(temperature=0.8, top_p=0.95)
    for vocab in args.vocab:
        model = model_of(vocab, args.hidden, args.layers)
        inputs = model.inputs(texts)
        kwargs, _, _ = model._start(inputs, None)
        plain = {"max_new_tokens": args.tokens}  # (_start's kwargs turn the checkpoint's processors off)

        def hf_sample(kwargs=kwargs, plain=plain, model=model):
            with torch.inference_mode():
                model.model.generate(**{**kwargs, **plain}, do_sample=True, temperature=0.8, top_p=0.95, top_k=None,
                                     num_beams=1)  # fmt: skip

        eos = model.model.generation_config.eos_token_id
        model.model.generation_config.eos_token_id = None  # exactly N tokens in every case
        cases = {
            "greedy": lambda model=model, inputs=inputs: model.generate(inputs, max_new_tokens=args.tokens),
            "hookpoints": lambda model=model, inputs=inputs: model.generate(
                inputs, max_new_tokens=args.tokens, sampling=sampling
            ),
            "hf": hf_sample,
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for case in cases.values():
            case()  # warm
        for _ in range(args.repeats):
            for name, case in cases.items():
                started = time.thread_time()
                case()
                times[name].append((time.thread_time() - started) * 1e3 / args.tokens)
        model.model.generation_config.eos_token_id = eos
        med = {name: statistics.median(values) for name, values in times.items()}
        best = {name: min(values) for name, values in times.items()}
        print(f"| {vocab:,} | {med['greedy']:.2f} ({best['greedy']:.2f}) | {med['hookpoints']:.2f} "
              f"({best['hookpoints']:.2f}) | {med['hookpoints'] / med['greedy']:.2f} | {med['hf']:.2f} "
              f"({best['hf']:.2f}) | {med['hf'] / med['greedy']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
