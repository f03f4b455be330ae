"""The prompt suite of text-to-image on scenes: reading captions, judging parsed cells, the suite, its scores."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from conftest import AE, DIFFUSION, DIT, assert_one_line_failure, cli, needs_fmnist, save_autoencoder, save_dit
from ldm.artifacts import ArtifactStore
from ldm.config import to_dict
from ldm.data import DataConfig
from ldm.data.scenes import CATEGORIES, COLOURS, HELD_OUT, ITEMS, Cell, SceneMaker
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.parser import SceneParser, SceneParserConfig, cell_targets
from ldm.prompts import (
    HELD_OUT_PER_CATEGORY,
    PER_CATEGORY,
    ObjectSpec,
    PromptSpec,
    SuitePrompt,
    judge,
    prompt_suite,
    score,
    spec_of,
)
from stages.prompts import evaluate_prompts, pipeline_generate, real_scenes, through_autoencoder

# ----------------------------------------------------------------------------- reading captions


def cells_demanded(spec: PromptSpec) -> Counter:
    """The (item, colour or None) objects a spec names, with their counts."""
    return Counter({(o.item, o.colour): o.count for o in spec.objects})


@needs_fmnist
@pytest.mark.parametrize("split, held_out", [("train", False), ("test", False), ("test", True)])
def test_spec_of_reads_back_every_caption_of_3000_scenes(split, held_out):
    maker = SceneMaker(split, download=False)
    for index in range(3000):
        truth, caption = maker.draw(index, held_out)
        spec = spec_of(caption, truth.category)
        assert spec.category == truth.category, caption
        objects = [cell for _, cell in truth.objects]
        if truth.category == "counting":
            (wanted,) = spec.objects
            assert (wanted.item, wanted.count) == (objects[0].item, len(objects)), caption
        else:
            assert sorted(o.item for o in spec.objects) == sorted(c.item for c in objects), caption
        for wanted in spec.objects:  # a named colour is the colour of that item in the scene
            assert wanted.colour in (None, next(c.colour for c in objects if c.item == wanted.item)), caption
        if truth.category in ("colors", "color_attr") or truth.holds_held_out:
            assert all(o.colour is not None for o in spec.objects), caption
        assert judge(spec, truth.cells), f"{caption!r} judged false of its own scene {truth.cells}"


@needs_fmnist
def test_spec_of_without_a_category_gives_the_narrowest_reading_that_fits():
    maker = SceneMaker("test", download=False)
    narrower = {"single_object": {"single_object", "colors"}, "two_object": {"two_object", "color_attr"}}
    for index in range(1000):
        truth, caption = maker.draw(index)
        assert spec_of(caption).category in narrower.get(truth.category, {truth.category}), caption


def test_spec_of_reads_relations_plurals_two_word_items_and_prefixes():
    spec = spec_of("a photo of a red ankle boot to the left of a sandal")
    assert spec == PromptSpec("position", (ObjectSpec("ankle boot", "red"), ObjectSpec("sandal")), "left")
    assert spec_of("an image of four cyan ankle boots") == PromptSpec(
        "counting", (ObjectSpec("ankle boot", "cyan", 4),)
    )
    assert spec_of("a bag beneath a trouser").relation == "below"
    assert spec_of("a trouser with a white top").category == "two_object"
    assert spec_of("A  Red bag").objects == (ObjectSpec("bag", "red"),)  # case and spaces do not matter


@pytest.mark.parametrize(
    "caption",
    ["a bag on a trouser", "five bags", "a pink bag", "", "a bag and", "two bag", "a bags", "bag", "a bag, a trouser"],
)
def test_spec_of_refuses_text_outside_the_grammar_naming_the_caption(caption):
    with pytest.raises(ValueError, match=f"caption {caption!r} is outside the scenes grammar"):
        spec_of(caption)


def test_spec_of_refuses_a_category_the_caption_cannot_be():
    assert spec_of("a red bag", "single_object").category == "single_object"  # its colour named on a coin flip
    with pytest.raises(ValueError, match="single_object prompt, not colors"):
        spec_of("a bag", "colors")
    with pytest.raises(ValueError, match="position prompt, not two_object"):
        spec_of("a bag above a trouser", "two_object")


# ----------------------------------------------------------------------------- judging parsed cells


def grid(*cells: tuple[str, str] | None) -> tuple[Cell | None, ...]:
    return tuple(None if c is None else Cell(*c) for c in cells)


def test_judge_single_object_and_colors():
    cells = grid(None, ("bag", "red"), None, ("top", "white"))
    assert judge(spec_of("a bag"), cells)
    assert judge(spec_of("a red bag"), cells)
    assert not judge(spec_of("a blue bag"), cells)  # a named colour must hold
    assert not judge(spec_of("a trouser"), cells)
    assert not judge(spec_of("a bag"), grid(None, None, None, None))


def test_judge_two_object_needs_both_items_in_any_cells():
    cells = grid(("bag", "red"), None, None, ("trouser", "blue"))
    assert judge(spec_of("a trouser and a bag"), cells)
    assert judge(spec_of("a blue trouser with a bag"), cells)
    assert not judge(spec_of("a trouser and a sandal"), cells)
    assert not judge(spec_of("a trouser and a bag"), grid(("bag", "red"), None, None, None))


def test_judge_color_attr_fails_when_the_colours_are_swapped():
    cells = grid(("bag", "red"), ("trouser", "blue"), None, None)
    assert judge(spec_of("a red bag and a blue trouser"), cells)
    assert not judge(spec_of("a blue bag and a red trouser"), cells)
    assert not judge(spec_of("a red bag and a red trouser"), cells)


def test_judge_counting_needs_exactly_n_of_the_item_all_in_the_named_colour():
    three = grid(("bag", "red"), ("bag", "red"), None, ("bag", "red"))
    assert judge(spec_of("three bags"), three)
    assert judge(spec_of("three red bags"), three)
    assert not judge(spec_of("two bags"), three)  # GenEval counts every detection of the class
    assert not judge(spec_of("four bags"), three)
    assert not judge(spec_of("three blue bags"), three)
    assert not judge(spec_of("three red bags"), grid(("bag", "red"), ("bag", "red"), None, ("bag", "green")))
    assert judge(spec_of("two bags"), grid(("bag", "red"), ("top", "red"), None, ("bag", "blue")))


def test_judge_position_needs_the_relation_within_a_row_or_a_column():
    cells = grid(("bag", "red"), ("trouser", "blue"), ("top", "white"), None)  # bag | trouser over top | -
    assert judge(spec_of("a bag to the left of a trouser"), cells)
    assert judge(spec_of("a trouser right of a red bag"), cells)
    assert judge(spec_of("a bag above a top"), cells)
    assert judge(spec_of("a top beneath a bag"), cells)
    assert not judge(spec_of("a bag to the right of a trouser"), cells)  # the wrong side
    assert not judge(spec_of("a top above a bag"), cells)
    assert not judge(spec_of("a blue bag left of a trouser"), cells)  # the named colour fails
    # The trouser (cell 1) and the top (cell 2) are diagonal: neither in a row nor in a column.
    assert not judge(spec_of("a top to the left of a trouser"), cells)
    assert not judge(spec_of("a trouser above a top"), cells)


def test_judge_refuses_a_parse_that_is_not_four_cells():
    with pytest.raises(ValueError, match="4 cells"):
        judge(spec_of("a bag"), grid(("bag", "red")))


# ----------------------------------------------------------------------------- the suite and its score


@pytest.fixture(scope="module")
def suite():
    return prompt_suite(download=False)


@needs_fmnist
def test_suite_has_geneval_shape_six_categories_and_a_held_out_group(suite):
    main = [p for p in suite if not p.held_out]
    held = [p for p in suite if p.held_out]
    assert Counter(p.category for p in main) == dict.fromkeys(CATEGORIES, PER_CATEGORY)
    assert Counter(p.category for p in held) == dict.fromkeys(CATEGORIES, HELD_OUT_PER_CATEGORY)
    assert (len(main), len(held)) == (552, 60)
    assert len({p.caption for p in suite}) == len(suite)  # no caption twice
    for prompt in held:
        assert any((o.item, o.colour) in HELD_OUT for o in prompt.spec.objects), prompt.caption
    for prompt in main:
        assert not any((o.item, o.colour) in HELD_OUT for o in prompt.spec.objects), prompt.caption


@needs_fmnist
def test_suite_is_deterministic_and_each_prompt_is_the_caption_of_its_test_scene(suite):
    assert prompt_suite(download=False) == suite
    assert prompt_suite(seed=1, download=False) != suite
    maker = SceneMaker("test", download=False)
    for prompt in suite:
        truth, caption = maker.draw(prompt.scene, prompt.held_out)
        assert (caption, truth.category) == (prompt.caption, prompt.category)


def prompt(category: str, held_out: bool = False) -> SuitePrompt:
    return SuitePrompt(f"{category}-{held_out}", PromptSpec(category, (ObjectSpec("bag"),)), 0, held_out)


def test_score_averages_categories_as_geneval_and_compares_held_out_with_the_same_categories():
    results = [(prompt(c), True) for c in CATEGORIES]  # every category right once ...
    results += [(prompt("counting"), False)] * 3  # ... counting right 1 time in 4
    results += [(prompt("colors", True), False), (prompt("colors", True), True), (prompt("position", True), False)]
    scores = score(results)
    assert scores["categories"]["counting"] == 0.25
    assert scores["overall"] == pytest.approx((5 + 0.25) / 6)  # the mean of category means, not of images
    assert scores["held_out_categories"] == {"colors": 0.5, "position": 0.0}
    assert scores["held_out"] == 0.25
    assert scores["seen_pairs"] == 1.0  # the main suite's colors and position
    assert scores["images"] == 12


# ----------------------------------------------------------------------------- evaluate_prompts


class OracleParser(SceneParser):
    """A parser that knows the truth of given scenes: it returns their cells' one-hot logits (for tests)."""

    def __init__(self, scenes: list[tuple[torch.Tensor, object]]) -> None:
        super().__init__(SceneParserConfig(width=2, cell_features=2))
        self.truths = {image.numpy().tobytes(): truth for image, truth in scenes}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        items, colours = cell_targets([self.truths[image.numpy().tobytes()] for image in images])
        item_logits = torch.nn.functional.one_hot(items, 1 + len(ITEMS)).float()  # (N, 4, 1 + items)
        colour_logits = torch.nn.functional.one_hot(colours.clamp_min(0), len(COLOURS)).float()
        return item_logits, colour_logits


@pytest.fixture(scope="module")
def small_suite():
    return prompt_suite(per_category=6, held_out_per_category=3, download=False)


@pytest.fixture(scope="module")
def oracle(small_suite):
    maker = SceneMaker("test", download=False)
    scenes = [maker.scene(p.scene, p.held_out) for p in small_suite]
    return OracleParser([(image, truth) for image, _, truth in scenes])


@needs_fmnist
def test_an_oracle_parser_scores_one_on_the_real_scenes_of_the_suite(small_suite, oracle):
    evaluation = evaluate_prompts(oracle, real_scenes(small_suite, download=False), small_suite, 2, batch_size=5)
    assert evaluation.scores["categories"] == dict.fromkeys(CATEGORIES, 1.0)
    assert (evaluation.scores["overall"], evaluation.scores["held_out"]) == (1.0, 1.0)
    assert evaluation.scores["images"] == 2 * len(small_suite)
    assert evaluation.features.count == 2 * 36  # the main suite's images only


@needs_fmnist
def test_images_of_the_wrong_prompts_score_below_one(small_suite, oracle):
    real = real_scenes(small_suite, download=False)
    captions = [p.caption for p in small_suite]
    shifted = {a: b for a, b in zip(captions, captions[1:] + captions[:1])}  # each prompt gets the next one's scene
    evaluation = evaluate_prompts(oracle, lambda cs, seeds: real([shifted[c] for c in cs], seeds), small_suite, 1)
    assert evaluation.scores["overall"] < 0.6


@needs_fmnist
def test_real_scenes_refuses_a_caption_outside_the_suite(small_suite):
    with pytest.raises(ValueError, match="'a bag' is not a prompt of the suite"):
        real_scenes(small_suite, download=False)(["a bag"], [0])


def test_reconstructions_refuse_an_autoencoder_that_is_not_rgb():
    with pytest.raises(ValueError, match="pass an autoencoder trained on scenes"):
        through_autoencoder(AutoencoderKL(AE), lambda captions, seeds: None)


class RecordingPipeline:
    """Stands for a text LatentDiffusionPipeline: records its sample calls, returns images that encode the seed."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], int]] = []

    def sample(self, *, prompts, settings, seed):
        self.calls.append((list(prompts), seed))
        return torch.arange(seed, seed + len(prompts)).float()[:, None, None, None].expand(-1, 3, 64, 64) / 1000


@needs_fmnist
def test_pipeline_prompts_are_sampled_at_consecutive_seeds_per_image(small_suite):
    pipe, parser = RecordingPipeline(), SceneParser(SceneParserConfig(width=2, cell_features=2))
    suite = small_suite[:3]
    evaluate_prompts(parser, pipeline_generate(pipe, settings=None), suite, 2, seed=10, batch_size=4)
    expected = [p.caption for p in suite for _ in range(2)]
    assert [caption for captions, _ in pipe.calls for caption in captions] == expected
    assert [seed for _, seed in pipe.calls] == [10, 14]  # image j of prompt i at seed 10 + 2i + j


# ----------------------------------------------------------------------------- ldm eval prompts


@pytest.fixture(scope="module")
def parser_store(tmp_path_factory):
    """A store with a random parser and a random RGB autoencoder."""
    store = ArtifactStore(tmp_path_factory.mktemp("prompts") / "store")
    torch.manual_seed(0)
    config = SceneParserConfig(width=4, cell_features=4)
    data = DataConfig(name="scenes", channels=3, resolution=64, download=False)
    store.save(
        "parser",
        tensors={"weights.safetensors": SceneParser(config).state_dict()},
        config={"model": to_dict(config), "data": to_dict(data)},
    )
    rgb = AutoencoderConfig(in_channels=3, resolution=64, ch=8, ch_mult=(1, 2), latent_channels=4, norm_groups=4)
    store.save(
        "autoencoder",
        tensors={"weights.safetensors": AutoencoderKL(rgb).state_dict()},
        config={"model": to_dict(rgb), "data": to_dict(data)},
    )
    grey = save_autoencoder(store, 0)  # a grayscale one, newest
    save_dit(store, DIT, DIFFUSION, 2, grey.ref)  # class-conditional
    return store


@needs_fmnist
@pytest.mark.timeout(120)
def test_eval_prompts_real_only_prints_real_and_reconstruction_columns(parser_store, tmp_path):
    rgb = parser_store.scan("autoencoder")[0][0].ref
    result = cli(
        parser_store, "eval", "prompts", "--real-only", "--autoencoder", rgb, "--limit", "2", "--out", tmp_path / "out"
    )
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if line.strip().startswith("real"))
    assert header.split() == ["real", "reconstruction"]
    for row in (*CATEGORIES, "overall", "held-out pairs", "Frechet distance"):
        assert any(line.strip().startswith(row) for line in result.output.splitlines()), row
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["columns"]) == {"real", "reconstruction"}
    assert (report["prompts"], report["held_out_prompts"]) == (12, 12)  # 2 of each category in each group
    assert (tmp_path / "out" / "images.png").is_file()


@needs_fmnist
@pytest.mark.timeout(60)
def test_eval_prompts_refuses_a_grayscale_autoencoder_in_one_line(parser_store, tmp_path):
    grey = parser_store.scan("autoencoder")[0][-1].ref
    result = cli(parser_store, "eval", "prompts", "--real-only", "--autoencoder", grey, "--limit", "1")
    assert_one_line_failure(result, "pass an autoencoder trained on scenes")


@needs_fmnist
@pytest.mark.timeout(60)
def test_eval_prompts_refuses_a_class_conditional_dit_in_one_line(parser_store):
    result = cli(parser_store, "eval", "prompts", "--limit", "1")
    assert_one_line_failure(result, "is class-conditional", "--real-only")
