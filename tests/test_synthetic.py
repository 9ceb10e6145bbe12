"""Synthetic learnability scenes: determinism, instruction/mask consistency, both output formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmseg_ros.data import JsonlDataset, ReasonSegDataset, mask_from_labelme
from llmseg_ros.data.reasonseg import read_annotation
from llmseg_ros.data.synthetic import (
    COLOURS,
    SyntheticConfig,
    SyntheticScene,
    generate_scene,
    generate_split,
    write_synthetic_dataset,
)


def _expected_targets(scene: SyntheticScene, family: str, key: str) -> set[int]:
    """Re-derive a query's answer from the object attributes alone."""
    objs = scene.objects
    size = scene.image.shape[0]
    if family == "shape":
        return {i for i, o in enumerate(objs) if o.shape == key}
    if family == "colour":
        return {i for i, o in enumerate(objs) if o.colour == key}
    if family == "shape_colour":
        colour, shape = key.split("_")
        return {i for i, o in enumerate(objs) if o.shape == shape and o.colour == colour}
    if family == "size":
        areas = [o.area for o in objs]
        return {int(np.argmax(areas)) if key == "largest" else int(np.argmin(areas))}
    if family == "position":
        axis = 0 if key in ("left", "right") else 1
        coords = [o.centroid[axis] for o in objs]
        return {int(np.argmin(coords)) if key in ("left", "top") else int(np.argmax(coords))}
    if family == "half":
        if key == "left":
            return {i for i, o in enumerate(objs) if o.bbox[2] < size / 2}
        return {i for i, o in enumerate(objs) if o.bbox[0] >= size / 2}
    raise AssertionError(family)


def test_same_seed_same_scene_and_different_seed_different_scene() -> None:
    a = generate_scene(7, questions=2)
    b = generate_scene(7, questions=2)
    c = generate_scene(8, questions=2)
    np.testing.assert_array_equal(a.image, b.image)
    assert [q.text for q in a.queries] == [q.text for q in b.queries]
    assert [q.targets for q in a.queries] == [q.targets for q in b.queries]
    assert not np.array_equal(a.image, c.image)


def test_scene_i_of_a_split_does_not_depend_on_the_split_length() -> None:
    short = generate_split("train", 3, seed=5)
    long = generate_split("train", 6, seed=5)
    for x, y in zip(short, long[:3]):
        np.testing.assert_array_equal(x.image, y.image)
    assert not np.array_equal(generate_split("val", 1, seed=5)[0].image, short[0].image)


def test_queries_answer_from_attributes_and_masks_match_objects() -> None:
    config = SyntheticConfig(image_size=96, max_objects=4)
    families = set()
    for scene in generate_split("check", 60, seed=1, config=config, questions=2):
        assert scene.image.shape == (96, 96, 3) and scene.image.dtype == np.uint8
        masks = np.stack([o.mask for o in scene.objects])
        assert masks.sum(axis=0).max() == 1  # objects never overlap
        for obj in scene.objects:
            # every object pixel is painted in its colour
            assert (scene.image[obj.mask] == COLOURS[obj.colour]).all()
        target_sets = [q.targets for q in scene.queries]
        assert len(set(target_sets)) == 2  # two questions, two different answers
        for query in scene.queries:
            families.add(query.family)
            targets = set(query.targets)
            assert targets == _expected_targets(scene, query.family, query.key), query
            assert 0 < len(targets) < len(scene.objects)  # never empty, never everything
            mask = scene.target_mask(query)
            np.testing.assert_array_equal(mask.astype(bool), masks[list(query.targets)].any(axis=0))
    assert families == {"shape", "colour", "shape_colour", "size", "position", "half"}


def test_answer_depends_on_the_instruction_not_on_object_size() -> None:
    scenes = generate_split("bias", 120, seed=2, questions=1)
    largest_hits = 0
    for scene in scenes:
        largest = int(np.argmax([o.area for o in scene.objects]))
        largest_hits += scene.queries[0].targets == (largest,)
    assert largest_hits / len(scenes) < 0.5
    sentences = [s.queries[0].is_sentence for s in scenes]
    assert 0.3 < np.mean(sentences) < 0.7


def test_samples_carry_instruction_and_mask() -> None:
    scene = generate_scene(3, questions=2, scene_id="s")
    samples = scene.samples()
    assert [s.image_id for s in samples] == ["s_q0", "s_q1"]
    for sample, query in zip(samples, scene.queries):
        assert sample.instruction == query.text and sample.is_sentence == query.is_sentence
        assert sample.instructions == (query.text, *query.paraphrases)
        np.testing.assert_array_equal(sample.mask, scene.target_mask(query))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="image_size must be >= 64"):
        SyntheticConfig(image_size=32)
    with pytest.raises(ValueError, match="need 2 <= min_objects <= max_objects <= 6"):
        SyntheticConfig(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="families must be a non-empty subset"):
        SyntheticConfig(families=("texture",))
    with pytest.raises(ValueError, match="questions must be >= 1"):
        generate_scene(0, questions=0)


def test_written_formats_agree_pixel_for_pixel(tmp_path: Path) -> None:
    splits = {"train": 4, "val": 3}
    outputs = write_synthetic_dataset(tmp_path / "a", splits, seed=11, questions=2)
    assert set(outputs) == {"train", "val"}
    scenes = generate_split("val", 3, seed=11, questions=2)
    jsonl = JsonlDataset(outputs["val"])
    reason = ReasonSegDataset(tmp_path / "a" / "reasonseg", "val")
    assert jsonl.sample_ids == reason.sample_ids == [f"val_{i:05d}_q{k}" for i in range(3) for k in range(2)]
    expected = [s for scene in scenes for s in scene.samples()]
    for exp, from_jsonl, from_reason in zip(expected, jsonl, reason):
        np.testing.assert_array_equal(from_jsonl.image, exp.image)  # PNG is lossless
        assert np.abs(from_reason.image.astype(int) - exp.image).mean() < 3  # JPEG
        np.testing.assert_array_equal(from_jsonl.mask, exp.mask)
        np.testing.assert_array_equal(from_reason.mask, exp.mask)  # labelme polygons rasterise back exactly
        assert from_jsonl.instruction == from_reason.instruction == exp.instruction
        assert from_reason.instructions == exp.instructions
        assert from_jsonl.is_sentence == from_reason.is_sentence == exp.is_sentence
    annotation = read_annotation(tmp_path / "a" / "reasonseg" / "val" / "val_00000_q0.json")
    assert {s["label"] for s in annotation["shapes"]} == {"target"}
    np.testing.assert_array_equal(mask_from_labelme(annotation, 112, 112), expected[0].mask)


def test_writing_is_deterministic_and_rle_variant_reads_back(tmp_path: Path) -> None:
    write_synthetic_dataset(tmp_path / "a", {"val": 2}, seed=4)
    write_synthetic_dataset(tmp_path / "b", {"val": 2}, seed=4, mask_format="rle")
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert not any(p.name.startswith(".") for p in files_a)  # no temporary files left
    write_synthetic_dataset(tmp_path / "c", {"val": 2}, seed=4)
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "c" / rel).read_bytes(), rel
    with_png = list(JsonlDataset(tmp_path / "a" / "jsonl" / "val.jsonl"))
    with_rle = list(JsonlDataset(tmp_path / "b" / "jsonl" / "val.jsonl"))
    for x, y in zip(with_png, with_rle):
        np.testing.assert_array_equal(x.mask, y.mask)
    with pytest.raises(ValueError, match="mask_format must be 'png' or 'rle'"):
        write_synthetic_dataset(tmp_path / "d", {"val": 1}, mask_format="npy")
