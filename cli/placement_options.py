"""The model-placement options every command that loads a model shares: --device, --model-dtype,
--device-map, --offload-folder (hookpoints.placement)."""

from __future__ import annotations

import click

DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")


def placement_options(command):
    """Add the four placement options to a click command (its function gets them as keyword arguments)."""
    options = [
        click.option(
            "--device",
            default="auto",
            show_default=True,
            help="auto (CUDA if present, else cpu), cpu, cuda or cuda:N.",
        ),
        click.option(
            "--model-dtype",
            type=click.Choice(DTYPE_CHOICES),
            default="auto",
            show_default=True,
            help="Precision the model runs in; auto: float32 on cpu, bfloat16 on a GPU that has it, else float16.",
        ),
        click.option(
            "--device-map",
            metavar="MAP",
            help="Split or offload the model (accelerate): auto, balanced, sequential, or module -> device as a "
            'JSON object or file, e.g. \'{"model.layers.0": 0, "model.layers.1": "disk"}\'.',
        ),
        click.option(
            "--offload-folder",
            type=click.Path(file_okay=False),
            help="Where modules a device map sends to disk are kept.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def load_options(device: str, model_dtype: str, device_map: str | None, offload_folder: str | None) -> dict:
    """The keyword arguments of ``hookpoints.loading.load`` the options stand for (the map parsed and checked)."""
    from hookpoints.placement import parse_device_map

    return {
        "device": device,
        "dtype": model_dtype,
        "device_map": parse_device_map(device_map),
        "offload_folder": offload_folder,
    }
