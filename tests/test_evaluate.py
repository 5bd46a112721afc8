"""Zero-shot and retrieval metrics: ties, NaN, unlabelled shards and a retrieval-only evaluation."""

import json

import pytest
import torch
import torch.nn.functional as F

from data.classes import load_classes
from tests.scripts.serving_fixtures import tiny_export  # noqa: F401 - fixture
from training.cli import shard_pattern
from training.errors import UserError
from training.evaluate import compute_metrics, evaluate_export, recall_at


def test_recall_counts_ties_against_the_pair_and_nan_as_a_miss():
    torch.manual_seed(0)
    image = F.normalize(torch.randn(20, 8), dim=-1)
    assert recall_at(image, image) == {1: 1.0, 5: 1.0, 10: 1.0}
    # A collapsed model scores every pair alike: chance (k / n), not a perfect score.
    same = F.normalize(torch.ones(20, 8), dim=-1)
    assert recall_at(same, same, chunk=7) == {1: 1 / 20, 5: 5 / 20, 10: 10 / 20}
    broken = torch.full((20, 8), float("nan"))
    assert recall_at(broken, image) == {1: 0.0, 5: 0.0, 10: 0.0}
    assert recall_at(image, broken) == {1: 0.0, 5: 0.0, 10: 0.0}
    # One NaN key outranks every finite pair, so each query drops one place.
    keys = image.clone()
    keys[3] = float("nan")
    assert recall_at(image, keys)[1] == 0.0 and recall_at(image, keys)[5] == 19 / 20


def test_zero_shot_is_left_out_when_no_sample_has_a_known_label():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(6, 4), dim=-1), F.normalize(torch.randn(6, 4), dim=-1)
    classifier = F.normalize(torch.randn(2, 4), dim=-1)
    result = compute_metrics(image, text, [None, "dog"] * 3, ["cat", "fish"], classifier)
    assert "zero_shot_top1" not in result and result["zero_shot_samples"] == 0 and result["num_samples"] == 6
    labels = ["cat", None, "fish", "cat", "dog", "fish"]
    result = compute_metrics(image, text, labels, ["cat", "fish"], classifier)
    predicted = (image @ classifier.T).argmax(1)
    expected = [int(predicted[i]) == ["cat", "fish"].index(labels[i]) for i in (0, 2, 3, 5)]
    assert result["zero_shot_samples"] == 4 and result["zero_shot_top1"] == sum(expected) / 4
    assert "zero_shot_samples" not in compute_metrics(image, text, labels, [], None)


def test_an_export_evaluates_retrieval_without_a_classes_file(tiny_export, synth_data):
    shards = shard_pattern(str(synth_data / "test"))
    retrieval = evaluate_export(str(tiny_export), shards, None)
    full = evaluate_export(str(tiny_export), shards, str(synth_data / "classes.json"))
    assert "zero_shot_top1" not in retrieval and full["zero_shot_samples"] == full["num_samples"] > 0
    assert {k: v for k, v in full.items() if "recall" in k} == {k: v for k, v in retrieval.items() if "recall" in k}


def test_shards_without_a_readable_sample_are_one_line_not_zero_recall(tiny_export, tmp_path):
    """Every sample skipped (here: captions without images) is an error (the loader's), not a score of 0."""
    import tarfile

    from data.files import add_tar_member

    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for key in ("a", "b"):
            add_tar_member(tar, f"{key}.txt", b"a caption")
    with pytest.raises(UserError, match=r"no usable sample in an epoch of 2 read from 1 shard \(.*shard-0.tar\): "
                                        r"2 no image"):
        evaluate_export(str(tiny_export), str(tmp_path / "shard-0.tar"), None)


@pytest.mark.parametrize("raw, needle", [
    ({"classes": "cat", "templates": ["a {}."]}, "'classes' must be a non-empty list of strings"),
    ({"classes": ["cat", 7], "templates": ["a {}."]}, "'classes' must be a non-empty list of strings"),
    ({"classes": ["cat"], "templates": [7]}, "'templates' must be a non-empty list of strings"),
    ({"classes": ["cat", "dog", "cat"], "templates": ["a {}."]}, "class names must be unique; repeated: 'cat'"),
    ({"classes": ["cat"], "templates": ["a {} on a {background}."]}, "template 'a {} on a {background}.'"),
    ({"classes": ["cat"], "templates": ["a photo of a {{}}."]}, "must hold exactly one '{}'"),
    ({"classes": ["cat"], "templates": ["a photo."]}, "must hold exactly one '{}'"),
    ({"classes": ["cat"], "templates": ["{{}}{:>1000000000000}"]}, "must hold exactly one '{}'"),  # not a MemoryError
    ({"classes": ["cat"], "templates": ["a {!r}."]}, "must hold exactly one '{}'"),
    ({"classes": ["cat"], "templates": ["a {0}."]}, "must hold exactly one '{}'"),
    ({"classes": ["cat"]}, "must be JSON with 'classes' and 'templates'"),
])
def test_a_bad_classes_file_is_one_line(tmp_path, raw, needle):
    path = tmp_path / "classes.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(UserError) as info:
        load_classes(path)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_literal_braces_in_a_template_are_allowed(tmp_path):
    path = tmp_path / "classes.json"
    path.write_text(json.dumps({"classes": ["cat"], "templates": ["{{a}} {}."]}))
    assert load_classes(path) == (["cat"], ["{{a}} {}."])
