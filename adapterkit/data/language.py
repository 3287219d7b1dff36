"""The language detector for `data clean --language` and `data.clean.languages`: py3langid, whose model
ships inside the package (no download), 97 languages by their ISO 639-1 codes."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any


@functools.cache
def identifier() -> Any:
    """py3langid's identifier with normalised probabilities (loaded once: about 0.7 s)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def unknown_languages(codes: Iterable[str]) -> list[str]:
    """The codes the detector does not know (the detector is loaded only when there are codes)."""
    codes = list(codes)
    if not codes:
        return []
    known = set(identifier().nb_classes)
    return [c for c in codes if c not in known]
