"""The sampled-decoding options of the commands that generate: --sample, --temperature, --top-k, --top-p,
--sample-seed (hookpoints.settings.Sampling; without --sample decoding is greedy)."""

from __future__ import annotations

import click
from hookpoints.cli.params import FiniteFloat


def sampling_options(command):
    """Add the five sampling options to a click command (its function gets them as keyword arguments)."""
    options = [
        click.option(
            "--sample",
            is_flag=True,
            help="Sample instead of decoding greedily; each example draws from its own stream, keyed by its id.",
        ),
        click.option("--temperature", type=FiniteFloat(), help="With --sample: divide the logits by T.  [default: 1]"),
        click.option("--top-k", type=int, help="With --sample: draw among the K most likely tokens only."),
        click.option("--top-p", type=FiniteFloat(), help="With --sample: draw among the fewest tokens holding P."),
        click.option(
            "--sample-seed", type=int, help="With --sample: the seed of every example's stream.  [default: 0]"
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def sampling_from(sample: bool, temperature, top_k, top_p, sample_seed):
    """The options as a ``Sampling`` (None: greedy); a UserError for a sampling option without ``--sample``."""
    from hookpoints.errors import UserError
    from hookpoints.settings import Sampling

    given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": sample_seed}
    given = {name: value for name, value in given.items() if value is not None}
    if not sample:
        if given:
            name = next(iter(given)).replace("_", "-").replace("seed", "sample-seed")
            raise UserError(f"--{name} sets sampled decoding: add --sample (without it decoding is greedy)")
        return None
    return Sampling(**given)
