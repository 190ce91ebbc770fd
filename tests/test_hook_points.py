"""Hook point names, metadata and selection, for every supported family (tiny models loaded by path)."""

from __future__ import annotations

import numpy as np
import pytest

from hookpoints.adapters.seamless import MAPS, TABLE1
from hookpoints.errors import UserError
from hookpoints.loading import load
from hookpoints.tiny import FAMILIES

LAYERS = 2  # every tiny model has 2 layers per stack


@pytest.mark.parametrize("family", FAMILIES)
def test_every_module_path_is_a_hook_name(tiny_model_dir, family):
    model = load(tiny_model_dir(family))
    points = model.hook_points
    for name, _ in model.model.named_modules():
        if not name:
            continue
        point = points.get(name)  # never raises: every module path names a hook point
        assert point.module == name and point.io == "output"
        # either recordable with a measured width, or a stated reason
        assert (point.width or 0) > 0 or point.unavailable, name
    recordable = [p for p in points.listed() if p.unavailable is None]
    assert recordable and all(p.width > 0 and p.component for p in recordable)


def test_seamless_speech_has_every_table1_component(tiny_model_dir):
    model = load(tiny_model_dir("seamless_m4t_v2"), modality="speech")
    config = model.model.config
    by_component: dict[str, set[str]] = {}
    for point in model.hook_points.listed():
        assert point.unavailable is None, (point.name, point.unavailable)
        by_component.setdefault(point.component, set()).add(point.submodule)
    assert set(by_component) == {"speech_encoder", "text_decoder"}
    for component in by_component:
        # + the attention maps (hookpoints.attention), which are recorded only when named
        assert by_component[component] == set(TABLE1[component]) | set(MAPS[component]) | {"hook_resid_post"}

    get = model.hook_points.get
    d = config.hidden_size
    conv = "speech_encoder.layers.1.conv_module"
    # The Conformer conv module is [batch, channels, time]: its neurons are channels.
    assert (get(f"{conv}.pointwise_conv1").width, get(f"{conv}.pointwise_conv1").neuron_axis) == (2 * d, 1)
    for sub in ("glu", "depthwise_conv", "pointwise_conv2"):
        assert (get(f"{conv}.{sub}").width, get(f"{conv}.{sub}").neuron_axis, get(f"{conv}.{sub}").time_axis) == (
            d,
            1,
            2,
        )
    assert get(f"{conv}.depthwise_layer_norm").neuron_axis == 2
    ffn = get("speech_encoder.layers.0.ffn1.intermediate_dense")
    assert ffn.width == config.speech_encoder_intermediate_size and ffn.layer == 0
    # cross-attention keys/values run over the encoder's (adaptor-subsampled) positions
    assert get("text_decoder.layers.0.cross_attention.k_proj").space == "encoder"
    assert get("text_decoder.layers.0.cross_attention.q_proj").space == "decoder"
    assert get("speech_encoder.layers.0.self_attn.linear_q").space == "input"
    # the canonical name and the module path are the same tensor
    assert get("speech_encoder.encoder.layers.0.conv_module.glu") is get(f"{conv.replace('.1.', '.0.')}.glu")
    # attention distance embeddings have no batch axis: named, but not recordable (as the paper excludes them)
    distance = get("speech_encoder.encoder.layers.0.self_attn.distance_embedding")
    assert distance.unavailable and "batch" in distance.unavailable


def test_seamless_text_has_text_encoder_and_decoder(tiny_model_dir):
    model = load(tiny_model_dir("seamless_m4t_v2"), modality="text")
    components = {p.component for p in model.hook_points.listed()}
    assert components == {"text_encoder", "text_decoder"}
    fc1 = model.hook_points.get("text_encoder.layers.1.ffn.fc1")
    assert fc1.width == model.model.config.encoder_ffn_dim and fc1.component == "text_encoder"
    selected = model.select(["text_decoder.layers.*.cross_attention.*_proj"])
    assert [p.name for p in selected] == [
        f"text_decoder.layers.{layer}.cross_attention.{proj}_proj"
        for layer in range(LAYERS)
        for proj in ("q", "k", "v", "out")
    ]
    # Table 1 totals per layer: encoder 8 components, decoder 13 (+ the layer outputs); a glob also
    # matches the bare module paths under it (dropouts, activation modules ...), which are not canonical.
    for component in ("text_encoder", "text_decoder"):
        layer0 = model.select([f"{component}.layers.0.*"])
        assert len([p for p in layer0 if p.canonical]) == len(TABLE1[component]) + 1
        assert any(p.name == f"{component}.layers.0.ffn.act" for p in layer0)


def test_transformerlens_aliases_and_module_paths(tiny_model_dir):
    model = load(tiny_model_dir("gpt2"))
    get = model.hook_points.get
    assert get("transformer.h.0.mlp.c_fc") is get("blocks.0.mlp.hook_pre")
    assert get("transformer.h.1.mlp.c_proj:input") is get("blocks.1.mlp.hook_post")
    q = get("blocks.0.attn.hook_q")
    assert (q.width, q.shape, q.part) == (64, (4, 16), (0, 3))
    assert get("blocks.1.hook_resid_post").layer_output and not get("blocks.1.hook_resid_mid").layer_output
    # bare modules outside the adapter's names keep their path and get a component and layer
    c_attn = get("transformer.h.1.attn.c_attn")
    assert (c_attn.name, c_attn.component, c_attn.layer, c_attn.width) == ("transformer.h.1.attn.c_attn", "lm", 1, 192)


def test_selection_is_in_execution_order_and_deduplicated(tiny_model_dir):
    model = load(tiny_model_dir("llama"))
    chosen = model.select(["blocks.1.*", "blocks.0.hook_resid_post", "model.layers.0", "blocks.0.attn.hook_q"])
    names = [p.name for p in chosen]
    assert names[:2] == ["blocks.0.attn.hook_q", "blocks.0.hook_resid_post"]
    assert len(names) == len(set(names))
    orders = [p.order for p in chosen]
    assert orders == sorted(orders)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("text_decoder.layer.*.ffn.fc1", "closest: text_decoder.layers.0.ffn.fc1"),
        ("text_decoder.layers.0.ffn.fc3", "closest: text_decoder.layers.0.ffn.fc2, text_decoder.layers.0.ffn.fc1"),
        ("speech_encoder.layers.*", "matches no recordable hook point"),
    ],
)
def test_patterns_that_match_nothing_name_the_closest_hook_points(tiny_model_dir, pattern, expected):
    model = load(tiny_model_dir("seamless_m4t_v2"), modality="text")
    with pytest.raises(UserError, match=expected.replace(".", r"\.").replace("*", r"\*")):
        model.select([pattern])


def test_unrecordable_hook_point_is_refused_with_its_reason(tiny_model_dir):
    model = load(tiny_model_dir("seamless_m4t_v2"), modality="speech")
    with pytest.raises(UserError, match="cannot be recorded: its tensor has no batch axis"):
        model.select(["speech_encoder.encoder.layers.0.self_attn.distance_embedding"])


@pytest.mark.parametrize(
    ("family", "modality", "components"),
    [
        ("whisper", None, {"speech_encoder", "text_decoder"}),
        ("qwen2_audio", "speech", {"audio_encoder", "audio_projector", "lm"}),
        ("qwen2_audio", None, {"lm"}),  # for text (its first modality): the audio tower does not run
        ("bert", None, {"encoder"}),
        ("qwen2", None, {"lm"}),
    ],
)
def test_family_components(tiny_model_dir, family, modality, components):
    model = load(tiny_model_dir(family), modality=modality)
    assert {p.component for p in model.hook_points.listed()} == components
    assert all(p.unavailable is None for p in model.hook_points.listed())


def test_audio_spaces(tiny_model_dir):
    whisper = load(tiny_model_dir("whisper")).hook_points
    assert (whisper.get("speech_encoder.conv1").space, whisper.get("speech_encoder.conv1").neuron_axis) == ("input", 1)
    assert whisper.get("speech_encoder.layers.0.fc1").space == "encoder"
    assert whisper.get("text_decoder.layers.0.encoder_attn.k_proj").space == "encoder"
    qwen = load(tiny_model_dir("qwen2_audio"), modality="speech").hook_points
    assert qwen.get("audio_encoder.layers.0.fc1").space == "audio_encoder"
    assert qwen.get("audio_projector.linear").space == "audio_tokens"
    assert qwen.get("blocks.0.hook_resid_post").space == "input"


def test_a_tensor_whose_positions_match_no_space_is_refused_not_flattened(tiny_model_dir):
    """The Conformer's ``depthwise_conv:input`` carries a causal left pad (kernel - 1 frames): its time axis
    matches no position space, so the probe reads it as one vector per example, [channels x probe frames].
    Recorded on other lengths, its rows were [channels x frames + 6] values (3,520 for a 4,864-wide hook):
    positions flattened into neurons, a width that changes per batch. It must be refused, naming the hook."""
    model = load(tiny_model_dir("seamless_m4t_v2"), modality="speech")
    name = "speech_encoder.encoder.layers.0.conv_module.depthwise_conv:input"
    point = model.select([name])[0]
    assert point.time_axis is None and point.width == 64 * (70 + 6)  # the probe's 70 frames, 64 channels
    rng = np.random.default_rng(0)
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (16_000, 9_000)]
    with pytest.raises(UserError, match=f"{name} has 3520 values per .* 4864"):
        model.pooled(model.speech_inputs(waves), [point], "mean")
    glu = model.select(["speech_encoder.layers.0.conv_module.glu"])  # the same tensor without the pad: fine
    assert model.pooled(model.speech_inputs(waves), glu, "mean")[glu[0].name].shape == (2, 64)


def test_every_path_reads_the_same_first_input_of_a_module_called_by_keyword():
    """``generate`` calls an encoder ``encoder(attention_mask=..., input_features=...)``: the probe, the edit
    groups and the plain torch hooks all take the keyword named as ``forward``'s first parameter (the probe and
    the hooks took the first keyword given: they measured and changed the mask)."""
    import torch
    from torch import nn

    from hookpoints.editing import EditGroup, NeuronEdit
    from hookpoints.hook_fns import hooked
    from hookpoints.inputs import ModelInputs
    from hookpoints.points import HookPoint
    from hookpoints.probe import observe

    class Encoder(nn.Module):
        def forward(self, input_features, attention_mask=None):
            return input_features * attention_mask[..., None]

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = Encoder()

        def forward(self, input_features, attention_mask):
            return self.encoder(attention_mask=attention_mask, input_features=input_features)

    wrapper = Wrapper()
    features, mask = torch.ones(2, 5, 3), torch.ones(2, 5)
    seen = observe(wrapper, ModelInputs({"input_features": features, "attention_mask": mask}, {"input": mask > 0}))
    assert seen["encoder", "input"].shape == (2, 5, 3)  # the features, not the [2, 5] mask

    point = HookPoint("encoder:input", "encoder", io="input", width=3, neuron_axis=2, time_axis=1, space="input")

    class Model:  # what hooked() reads of a HookedModel
        model = wrapper

    with hooked(Model(), [(point, lambda x: x.index_fill(-1, torch.tensor([1]), 7.0))]):
        out = wrapper(features, mask)
    assert out[..., 1].eq(7).all() and out[..., 0].eq(1).all()
    group = EditGroup([NeuronEdit(point, torch.tensor([2]), torch.tensor([5.0]))])
    handle = wrapper.encoder.register_forward_pre_hook(group.input_hook, with_kwargs=True)
    try:
        out = wrapper(features.clone(), mask)
    finally:
        handle.remove()
    assert out[..., 2].eq(5).all() and out[..., 0].eq(1).all()
