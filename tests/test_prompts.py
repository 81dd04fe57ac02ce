import warnings

import pytest

from motion_adapters.prompts import appearance_invariant_prompt, warn_if_scene_prompt


@pytest.mark.parametrize(
    ("full", "invariant"),
    [
        ("a cat is roaring on the grass under the tree", "a cat is roaring"),  # the paper's example
        ("A seagull is walking on the beach.", "A seagull is walking"),
        ("a bird is flying above the sea", "a bird is flying"),
        ("a car is drifting on a snowy road at night", "a car is drifting"),
        ("a man in a suit is dancing in the street", "a man in a suit is dancing"),
        ("a skier skiing down a snowy mountain", "a skier skiing down a snowy mountain"),  # motion words stay
        ("a red circle moving left on a blue background", "a red circle moving left"),  # the shapes world
        ("a lion is roaring", "a lion is roaring"),
    ],
)
def test_scene_phrases_are_dropped_and_motion_kept(full, invariant):
    assert appearance_invariant_prompt(full) == invariant


def test_scene_prompt_warns_with_a_suggestion_and_invariant_prompt_does_not():
    with pytest.warns(UserWarning, match="such as 'a dog is running'"):
        assert warn_if_scene_prompt("a dog is running on the beach") == "a dog is running"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_scene_prompt("a dog is running")


def test_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="prompt='' must be a non-empty string"):
        appearance_invariant_prompt("")


@pytest.mark.parametrize("prompt, expected", [
    ("an orange square moving in a circle quickly on a black background", "an orange square moving in a circle quickly"),
    ("a man spinning in circles on the beach", "a man spinning in circles"),
    ("a dog is running in the park", "a dog is running"),
])  # fmt: skip
def test_motion_phrases_that_open_with_a_preposition_are_kept(prompt, expected):
    assert appearance_invariant_prompt(prompt) == expected
