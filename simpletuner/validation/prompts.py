"""Which prompts a validation round renders.

In order: ``validation_prompt`` (short name "validation"), the entries of the
``user_prompt_library`` JSON file ({"short_name": "prompt", ...}), the built-in
library when ``validation_prompt_library`` is on, and finally an empty prompt
("unconditional") unless ``validation_disable_unconditional`` is set. The
unconditional render is only added when at least one real prompt exists.

With validation_using_datasets, ``dataset_inputs`` adds prompts that carry an
input image (a dataset image and its caption); those render image-to-image.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from PIL import Image

from simpletuner.config.errors import ConfigError

VALIDATION_SHORTNAME = "validation"
UNCONDITIONAL_SHORTNAME = "unconditional"

# The built-in library: varied subjects, media and lighting, so a round shows how
# the model treats things the training data may not cover.
BUILTIN_PROMPT_LIBRARY: dict[str, str] = {
    "lighthouse_storm": "a lighthouse on a rocky cliff during a thunderstorm, waves crashing, dramatic sky",
    "portrait_window": "close-up portrait of an elderly fisherman by a window, soft morning light, detailed skin",
    "city_night_rain": "a narrow city street at night in the rain, neon reflections on wet asphalt",
    "watercolour_fox": "a watercolour painting of a red fox curled up in fresh snow",
    "desk_still_life": "still life of a cluttered wooden desk with an old typewriter, books and a coffee cup",
    "mountain_lake": "an alpine lake at sunrise with mirror reflections of snowy peaks",
    "robot_garden": "a small rusty robot watering flowers in a greenhouse, whimsical illustration",
    "food_ramen": "overhead photo of a bowl of ramen with egg, scallions and nori on a dark table",
    "architecture_brutalist": "a brutalist concrete building under a clear blue sky, wide angle photograph",
    "ink_dragon": "black ink brush drawing of a dragon coiling through clouds on rice paper",
    "kids_drawing_house": "a child's crayon drawing of a house with a smiling sun and a family of four",
    "macro_dewdrops": "macro photograph of dewdrops on a spider web, shallow depth of field",
    "typography_sign": "a hand-painted wooden sign that says OPEN, hanging on a shop door",
    "space_station": "interior of a space station module with astronauts floating, earth through the window",
    "cat_sunbeam": "a ginger cat asleep in a sunbeam on a patterned rug",
    "desert_caravan": "a camel caravan crossing sand dunes at golden hour, long shadows",
}

_SLUG_UNSAFE = re.compile(r"[^a-z0-9_-]+")


@dataclass(frozen=True)
class ValidationPrompt:
    shortname: str
    text: str
    # img2img validation: the image to start from, and where it came from (dataset:path:stamp)
    input_image: Image.Image | None = field(default=None, compare=False, repr=False)
    input_source: str = ""

    @property
    def input_size(self) -> tuple[int, int] | None:
        return self.input_image.size if self.input_image is not None else None

    @property
    def slug(self) -> str:
        """The short name as it appears in file names and tracker tags."""
        return slug(self.shortname)

    @property
    def is_unconditional(self) -> bool:
        return self.text == ""


def slug(name: str) -> str:
    cleaned = _SLUG_UNSAFE.sub("_", name.strip().lower()).strip("_")
    return cleaned[:48] or "prompt"


def negative_prompt(settings) -> str | None:
    """validation_negative_prompt, or None when it is empty."""
    text = settings.validation_negative_prompt
    return text if text else None


def read_user_prompt_library(path: str) -> dict[str, str]:
    """A user_prompt_library file: one JSON object mapping short names to prompt strings."""
    if not os.path.isfile(path):
        raise ConfigError("user_prompt_library", f"user_prompt_library={path!r}: file not found. Point it at a JSON "
                                                 "file like {\"shortname\": \"your prompt\"}.")
    try:
        with open(path, encoding="utf-8") as handle:
            library = json.load(handle)
    except json.JSONDecodeError as exc:
        raise ConfigError("user_prompt_library", f"{path}: not valid JSON at line {exc.lineno}, column "
                                                 f"{exc.colno}: {exc.msg}.") from exc
    if not isinstance(library, dict) or not library:
        raise ConfigError("user_prompt_library", f"{path}: expected a non-empty JSON object mapping short names "
                                                 "to prompts, e.g. {\"castle\": \"a castle at dusk\"}.")
    for name, text in library.items():
        if not isinstance(text, str) or not text.strip():
            raise ConfigError("user_prompt_library", f"{path}: entry {name!r} must be a non-empty prompt string, "
                                                     f"not {json.dumps(text)}.")
    return dict(library)


def load_prompts(settings) -> list[ValidationPrompt]:
    """Every prompt a validation round renders, in order; empty when no prompt is configured."""
    named: list[tuple[str, str, str]] = []  # (shortname, text, where it came from)
    if settings.validation_prompt:
        named.append((VALIDATION_SHORTNAME, settings.validation_prompt, "validation_prompt"))
    if settings.user_prompt_library:
        source = f"user_prompt_library ({settings.user_prompt_library})"
        named.extend((name, text, source) for name, text in read_user_prompt_library(settings.user_prompt_library).items())
    if settings.validation_prompt_library:
        named.extend((name, text, "the built-in prompt library") for name, text in BUILTIN_PROMPT_LIBRARY.items())
    prompts = _unique(named)
    if prompts and not settings.validation_disable_unconditional:
        prompts.append(ValidationPrompt(UNCONDITIONAL_SHORTNAME, ""))
    return prompts


def _unique(named: list[tuple[str, str, str]]) -> list[ValidationPrompt]:
    seen: dict[str, str] = {}
    prompts = []
    for name, text, source in named:
        key = slug(name)
        if key in seen:
            raise ConfigError("user_prompt_library", f"the short name {name!r} from {source} is already used by "
                                                     f"{seen[key]}; rename it in your user_prompt_library file.")
        if key == UNCONDITIONAL_SHORTNAME:
            raise ConfigError("user_prompt_library", f"the short name {name!r} from {source} is reserved for the "
                                                     "empty-prompt render; pick another name.")
        seen[key] = source
        prompts.append(ValidationPrompt(name, text))
    return prompts
