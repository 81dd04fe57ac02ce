"""Appearance-invariant prompts: keep the subject and its motion, drop the scene.

VMC trains on prompts that name what moves and how ("a cat is roaring"), not where ("on the grass under the
tree"): the scene words would otherwise soak up appearance into the motion adapter and fight new scenes later.
"""

from __future__ import annotations

import re
import warnings

# Prepositions that open a scene phrase. "down", "up", "across", "through", "around" are left out on purpose:
# they usually describe the motion itself ("skiing down", "moving up", "running across").
SCENE_PREPOSITIONS = (
    "on", "in", "at", "under", "beneath", "below", "over", "above", "near", "beside", "by", "behind",
    "inside", "next", "against", "among", "between", "amid", "during", "with",
)
# Phrases that open with a scene preposition but describe the motion ("moving in a circle", "spinning in circles").
MOTION_PHRASES = (r"in\s+(?:a\s+)?circles?", r"in\s+place", r"on\s+the\s+spot")
_SCENE = re.compile(
    r"\s+(?!(?:" + "|".join(MOTION_PHRASES) + r")\b)(?:" + "|".join(SCENE_PREPOSITIONS) + r")\b.*$", re.IGNORECASE
)
_FIRST_VERB = re.compile(r"\b(?:is|are|was|were)\s+\w+|\b\w+ing\b", re.IGNORECASE)


def appearance_invariant_prompt(prompt: str) -> str:
    """Drop the scene phrase that follows the action ("... on the grass under the tree").

    The cut is made at the first scene preposition after the first verb ("is roaring", "walking"), so
    prepositions inside the subject ("a man in a suit is dancing") survive.

    Example:
        >>> appearance_invariant_prompt("A cat is roaring on the grass under the tree")
        'A cat is roaring'
        >>> appearance_invariant_prompt("a red circle moving left on a blue background")
        'a red circle moving left'
        >>> appearance_invariant_prompt("an orange square moving in a circle quickly on a black background")
        'an orange square moving in a circle quickly'
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt={prompt!r} must be a non-empty string.")
    text = " ".join(prompt.strip().rstrip(".").split())
    verb = _FIRST_VERB.search(text)
    if verb is None:
        return text
    head, tail = text[: verb.end()], text[verb.end() :]
    return head + _SCENE.sub("", tail)


def warn_if_scene_prompt(prompt: str) -> str:
    """Warn when a training prompt describes the scene; return the appearance-invariant suggestion.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = warn_if_scene_prompt("a dog is running on the beach")
        >>> len(caught)
        1
    """
    suggestion = appearance_invariant_prompt(prompt)
    if suggestion.lower() != " ".join(prompt.strip().rstrip(".").split()).lower():
        warnings.warn(
            f"training prompt {prompt!r} looks like a full scene description; VMC learns motion best from an "
            f"appearance-invariant prompt such as {suggestion!r} (see motion_adapters.appearance_invariant_prompt).",
            UserWarning,
            stacklevel=2,
        )
    return suggestion
