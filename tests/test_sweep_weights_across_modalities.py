"""An intervention sweep in one modality of SeamlessM4T v2 with the medians of a run recorded in the other
(``--stats-run``): the two modalities load two classes of one checkpoint, whose whole digests differ (each has a
module the other lacks), so the sweep compares the parts both have (hookpoints.model_digest.part_digests)."""

from __future__ import annotations

import pytest
from hookpoints.analyses.intervention_sweep import SweepSpec, plan_sweep

from hookpoints.errors import UserError
from hookpoints.loading import load
from hookpoints.model_digest import check_weights
from tests.test_interventions import swept  # noqa: F401  (the module's recorded and ranked store)


def _plan(store, model_dir, corpus, stats_run: str = "t2tt") -> list:
    spec = SweepSpec(
        "x", runs=("s2tt", "t2tt"), tasks=("s2tt",), stats_runs=(stats_run,), ks=(5,), languages=("de",), limit=1,
        max_new_tokens=6, model=str(model_dir), data=str(corpus.speech),
    )  # fmt: skip
    return plan_sweep(store, spec, lambda source, modality: load(source, modality=modality))


def test_a_speech_sweep_with_a_text_runs_medians_compares_the_shared_parts(swept, corpus, tiny_model_dir):  # noqa: F811
    store, model_dir = swept
    config = store.run_info("t2tt").config
    assert config["model_class"] == "SeamlessM4Tv2ForTextToText"
    assert {"text_decoder", "text_encoder", "lm_head"} <= set(config["model_digest_parts"]["float32"])
    assert len(_plan(store, model_dir, corpus)) == 1  # was refused: "does not have the weights run 't2tt'"
    with pytest.raises(
        UserError, match=r"^model .*seamless_m4t_v2-1.* does not have the weights run 't2tt' .*digest of"
    ):
        _plan(store, tiny_model_dir("seamless_m4t_v2", seed=1), corpus)


def test_a_run_of_another_class_without_part_digests_is_not_called_other_weights(swept):  # noqa: F811
    store, model_dir = swept
    config = {k: v for k, v in store.run_info("t2tt").config.items() if k != "model_digest_parts"}
    speech = load(model_dir, modality="speech").model
    with pytest.raises(
        UserError, match="^cannot check that model m .loaded as SeamlessM4Tv2ForSpeechToText. .* share no"
    ):
        check_weights(speech, config, "t2tt", "m")
    check_weights(speech, store.run_info("s2tt").config, "s2tt", "m")  # its own class: the whole digest
