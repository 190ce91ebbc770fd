"""Language codes: the labels manifests carry (ISO 639-1 ``de``, FLEURS ``de_de``) and the codes models use.

SeamlessM4T names languages by ISO 639-3-style codes (``deu``, ``cmn``) and marks them with tokens such as
``__deu__``; the bundled corpus and most manifests use two-letter codes. :func:`model_code` maps either form to
the model's code.
"""

from __future__ import annotations

#: ISO 639-1 -> SeamlessM4T's three-letter codes (the six of the paper first).
SEAMLESS_CODES = {
    "en": "eng",
    "de": "deu",
    "es": "spa",
    "fr": "fra",
    "zh": "cmn",
    "ja": "jpn",
    "ar": "arb",
    "cs": "ces",
    "fi": "fin",
    "hi": "hin",
    "id": "ind",
    "it": "ita",
    "ko": "kor",
    "nl": "nld",
    "pl": "pol",
    "pt": "por",
    "ru": "rus",
    "sv": "swe",
    "tr": "tur",
    "uk": "ukr",
    "vi": "vie",
}

#: FLEURS folder names -> ISO 639-1 (the paper's six and a few more; others keep their FLEURS name).
FLEURS_LANGUAGES = {
    "en_us": "en",
    "de_de": "de",
    "es_419": "es",
    "fr_fr": "fr",
    "cmn_hans_cn": "zh",
    "ja_jp": "ja",
    "ar_eg": "ar",
    "cs_cz": "cs",
    "fi_fi": "fi",
    "hi_in": "hi",
    "id_id": "id",
    "it_it": "it",
    "ko_kr": "ko",
    "nl_nl": "nl",
    "pl_pl": "pl",
    "pt_br": "pt",
    "ru_ru": "ru",
    "sv_se": "sv",
    "tr_tr": "tr",
    "uk_ua": "uk",
    "vi_vn": "vi",
}


def model_code(language: str) -> str:
    """The model-side code of a language label: ``de`` -> ``deu``; ``deu`` and ``__deu__`` stay ``deu``."""
    code = language.strip().strip("_").lower()
    code = FLEURS_LANGUAGES.get(code, code)
    return SEAMLESS_CODES.get(code, code)
