"""The prompt suite of text-to-image on scenes and its scoring, after GenEval (Ghosh et al. 2023).

GenEval asks a model for images of about 550 prompts in six categories and checks each image with an
object detector. Here the prompts are captions of the scenes grammar (`ldm.data.scenes`), each drawn
from a test-split scene that realises it, and the detector is the scene parser (`ldm.models.parser`),
which reads the four cells of an image. This module knows nothing of any generator.

`spec_of(caption)` reads what a caption demands; `judge(spec, cells)` says whether the cells an image was
parsed into meet it; `prompt_suite()` is the fixed list of prompts, with a separate group naming the
held-out (item, colour) pairs; `score(results)` averages verdicts as GenEval does.

Rules of `judge`, GenEval's adapted to the grid. An object is "present" when a cell holds its item, and
its colour when the prompt names one (in every category: a named colour must hold). Extra objects do
not matter, except to counting, where GenEval counts every detection of the class:

    single_object, colors   a cell holds the object
    two_object, color_attr  two different cells hold the two objects
    counting                exactly N cells hold the item, and every one in the named colour if any
    position                two cells hold the objects, the first in the named relation to the second

Position is stricter than GenEval's: "left of" and "right of" need the two cells to share a row, "above"
and "below" to share a column, which is how the scenes grammar places them; GenEval compares the
centres of two boxes only, so it would also accept a diagonal pair of cells.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ldm.data.scenes import (
    CATEGORIES,
    COLOURS,
    COUNT_WORDS,
    DEFAULT_SEED,
    ITEMS,
    JOINERS,
    PLURALS,
    PREFIXES,
    RELATIONS,
    SPLIT_SIZES,
    Cell,
    SceneMaker,
)

PER_CATEGORY = 92  # prompts per category; 6 x 92 = 552, GenEval's 553 in all
HELD_OUT_PER_CATEGORY = 10  # prompts per category that name a held-out pair: a group of 60


@dataclass(frozen=True)
class ObjectSpec:
    """One object a prompt demands: an item, in a colour when named, `count` times (more than 1: counting)."""

    item: str
    colour: str | None = None
    count: int = 1


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt demands: its objects, and for position the relation of the first to the second."""

    category: str  # one of CATEGORIES
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None  # "left", "right", "above" or "below": objects[0] is so placed from objects[1]


@dataclass(frozen=True)
class SuitePrompt:
    """A prompt of the suite and the test-split scene that realises it (`SceneMaker("test").scene(scene, held_out)`)."""

    caption: str
    spec: PromptSpec
    scene: int
    held_out: bool  # the scene, and so the prompt, holds a held-out (item, colour) pair

    @property
    def category(self) -> str:
        return self.spec.category


# ----------------------------------------------------------------------------- reading captions


def _alternatives(words: Iterable[str]) -> str:
    """A regex group of `words`, longest first, so that "to the left of" wins over "left of"."""
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_COLOUR = _alternatives(COLOURS)
_NOUN = rf"an? (?:(?P<colour{{k}}>{_COLOUR}) )?(?P<item{{k}}>{_alternatives(ITEMS)})"
_PHRASE_RELATION = {phrase: relation for relation, phrases in RELATIONS.items() for phrase in phrases}
_SINGULAR = {plural: item for item, plural in PLURALS.items()}
_NUMBER = {word: n for n, word in COUNT_WORDS.items()}
_PREFIX = rf"(?:{_alternatives(p for p in PREFIXES if p)})?"
_COUNTING = re.compile(
    rf"{_PREFIX}(?P<number>{_alternatives(_NUMBER)}) (?:(?P<colour>{_COLOUR}) )?(?P<plural>{_alternatives(_SINGULAR)})"
)
_ONE = re.compile(_PREFIX + _NOUN.format(k=0))
_TWO = re.compile(
    rf"{_PREFIX}{_NOUN.format(k=0)}(?P<link>{_alternatives(JOINERS)}|"
    rf" (?:{_alternatives(_PHRASE_RELATION)}) ){_NOUN.format(k=1)}"
)


def spec_of(caption: str, category: str | None = None) -> PromptSpec:
    """What `caption`, a caption of the scenes grammar, demands; ValueError naming it if it is outside the grammar.

    Case and runs of spaces do not matter; "a" and "an" are both accepted before any word. A caption alone
    cannot always tell its category ("a red bag" is a colors or a single_object prompt): without `category`
    it is the narrowest that fits (a named colour makes one object colors, two different named colours make
    two objects color_attr); a given `category` must fit the caption.
    """
    text = " ".join(caption.lower().split())
    if m := _COUNTING.fullmatch(text):
        objects = (ObjectSpec(_SINGULAR[m["plural"]], m["colour"], _NUMBER[m["number"]]),)
        spec = PromptSpec("counting", objects)
    elif m := _ONE.fullmatch(text):
        spec = PromptSpec("colors" if m["colour0"] else "single_object", (ObjectSpec(m["item0"], m["colour0"]),))
    elif m := _TWO.fullmatch(text):
        objects = (ObjectSpec(m["item0"], m["colour0"]), ObjectSpec(m["item1"], m["colour1"]))
        relation = _PHRASE_RELATION.get(m["link"].strip())
        coloured = m["colour0"] and m["colour1"] and m["colour0"] != m["colour1"]
        inferred = "position" if relation else "color_attr" if coloured else "two_object"
        spec = PromptSpec(inferred, objects, relation)
    else:
        raise ValueError(
            f"caption {caption!r} is outside the scenes grammar: write e.g. 'a red bag', 'two blue sneakers', "
            f"'a trouser and a bag', 'a top to the left of a sandal' (see ldm.data.scenes)"
        )
    if category is None or category == spec.category:
        return spec
    if category not in CATEGORIES:
        raise ValueError(f"category must be one of {list(CATEGORIES)}, got {category!r}")
    if category not in _ALSO_READS.get(spec.category, ()):
        raise ValueError(f"caption {caption!r} is a {spec.category} prompt, not {category}")
    return PromptSpec(category, spec.objects, spec.relation)


# The other categories a caption read as the key may belong to: single_object and two_object name colours on a
# coin flip (and two_object's two items may then differ in colour). Their verdicts agree: named colours must hold.
_ALSO_READS: dict[str, tuple[str, ...]] = {"colors": ("single_object",), "color_attr": ("two_object",)}


# ----------------------------------------------------------------------------- judging parsed cells


def _holds(cell: Cell | None, wanted: ObjectSpec) -> bool:
    """Whether a cell holds the object: its item, and its colour when one is named."""
    return cell is not None and cell.item == wanted.item and wanted.colour in (None, cell.colour)


def _relation(subject: int, reference: int) -> str | None:
    """Where cell `subject` is from cell `reference`: within a row left/right, within a column above/below."""
    if subject // 2 == reference // 2 and subject != reference:
        return "left" if subject % 2 < reference % 2 else "right"
    if subject % 2 == reference % 2 and subject != reference:
        return "above" if subject < reference else "below"
    return None  # the same cell, or a diagonal pair


def judge(spec: PromptSpec, cells: Sequence[Cell | None]) -> bool:
    """Whether an image parsed into `cells` (4 in reading order, None where empty) meets `spec` (the module's rules)."""
    if len(cells) != 4:
        raise ValueError(f"a scene has 4 cells, got {len(cells)}")
    if spec.category == "counting":
        (wanted,) = spec.objects
        of_item = [cell for cell in cells if cell is not None and cell.item == wanted.item]
        return len(of_item) == wanted.count and all(_holds(cell, wanted) for cell in of_item)
    places = [[k for k, cell in enumerate(cells) if _holds(cell, wanted)] for wanted in spec.objects]
    if len(places) == 1:
        return bool(places[0])
    first, second = places
    pairs = [(a, b) for a in first for b in second if a != b]
    if spec.category == "position":
        return any(_relation(a, b) == spec.relation for a, b in pairs)
    return bool(pairs)


# ----------------------------------------------------------------------------- the suite and its score


def prompt_suite(
    seed: int = 0,
    per_category: int = PER_CATEGORY,
    held_out_per_category: int = HELD_OUT_PER_CATEGORY,
    root: str | None = None,
    download: bool = True,
) -> list[SuitePrompt]:
    """GenEval's shape for scenes: `per_category` prompts of each category, then `held_out_per_category` of each
    that name a held-out pair; every prompt the caption of a test-split scene, no caption twice.

    `seed` chooses the scenes (in a seeded order of the test split's scene indices); the same seed gives the
    same suite. The held-out group follows the main one, each prompt marked `held_out`.
    """
    if per_category < 1 or held_out_per_category < 0:
        raise ValueError(
            f"a suite needs >= 1 prompt per category, got {per_category} (held out {held_out_per_category})"
        )
    maker = SceneMaker("test", DEFAULT_SEED, root=root, download=download)
    order = np.random.default_rng([seed, 0x5C0E]).permutation(SPLIT_SIZES["test"]).tolist()
    seen: set[str] = set()
    suite = _draw(maker, order, False, per_category, seen)
    return suite + (_draw(maker, order, True, held_out_per_category, seen) if held_out_per_category else [])


def _draw(maker: SceneMaker, order: list[int], held_out: bool, per_category: int, seen: set[str]) -> list[SuitePrompt]:
    """`per_category` prompts of each category from the scenes `order` lists, captions not in `seen` (which grows)."""
    chosen: dict[str, list[SuitePrompt]] = {category: [] for category in CATEGORIES}
    for index in order:
        truth, caption = maker.draw(index, held_out)
        if caption in seen or len(chosen[truth.category]) == per_category:
            continue
        seen.add(caption)
        chosen[truth.category].append(SuitePrompt(caption, spec_of(caption, truth.category), index, held_out))
        if all(len(prompts) == per_category for prompts in chosen.values()):
            break
    return [prompt for category in CATEGORIES for prompt in chosen[category]]


def score(results: Iterable[tuple[SuitePrompt, bool]]) -> dict:
    """GenEval's scores of judged images, (prompt, verdict) pairs (several images of one prompt: several pairs).

    Returns per-category means of the main suite (`categories`), `overall` (the mean of the category means,
    GenEval's overall score), the held-out group's score (`held_out`, the mean of its category means)
    and, for comparison, the main suite's mean over the same categories (`seen_pairs`); `images` counts them.
    """
    verdicts: dict[tuple[bool, str], list[bool]] = {}
    for prompt, verdict in results:
        verdicts.setdefault((prompt.held_out, prompt.category), []).append(bool(verdict))
    means = {key: sum(values) / len(values) for key, values in verdicts.items()}
    seen = {category: means[(False, category)] for category in CATEGORIES if (False, category) in means}
    held = {category: means[(True, category)] for category in CATEGORIES if (True, category) in means}
    both = [category for category in held if category in seen]
    return {
        "categories": seen,
        "overall": _mean(seen.values()),
        "held_out": _mean(held.values()),
        "held_out_categories": held,
        "seen_pairs": _mean(seen[category] for category in both),
        "images": sum(len(values) for values in verdicts.values()),
    }


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None
