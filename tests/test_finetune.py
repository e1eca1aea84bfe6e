"""Fine-tuning the deepest blocks with L2-SP on cached activations (random weights, 32 px)."""

import numpy as np
import pytest
import tensorflow as tf

from models import heads
from models.augmentation import Augmentation
from models.finetune import (BLOCKS, FineTuneConfig, ServedBlocks, UpperBlocks, cache_activations,
                             fine_tune, load_blocks, pretrained_weights, served_pass,
                             serialize_blocks)


@pytest.fixture(scope="module")
def data(backbone):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (24, 32, 32, 3)).astype(np.uint8)
    labels = np.array([0, 1] * 12)
    images[labels == 1] //= 3  # darker: learnable
    return images, labels


@pytest.mark.parametrize("blocks", [1, 2])
def test_untrained_upper_blocks_give_the_backbones_features(backbone, data, blocks):
    images, _ = data
    cache = cache_activations(images, backbone, blocks, views=0, augmentation=Augmentation(),
                              rng=np.random.default_rng(0))
    upper = UpperBlocks(blocks, cache.array.shape[2:], pretrained_weights(backbone, blocks))
    features = upper.features(tf.constant(cache.array[:, 0])).numpy()
    # NB: the activations are cached in float16; the rest is the same float32 computation.
    np.testing.assert_allclose(features, backbone.features(images), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("blocks", [1, 2])
def test_served_blocks_compute_what_the_keras_blocks_do_through_one_shared_trace(backbone, data,
                                                                                 blocks, precision):
    images, _ = data
    cut = BLOCKS[blocks][0]
    activations = backbone.activations(images[:5], cut).astype(np.float16)
    shape = backbone.activation_shape(cut)
    run = served_pass(blocks, shape, precision)
    # bfloat16 convolutions may sum in another order; float32 ones agree to rounding
    tolerance = 1e-5 if precision == "float32" else 1e-2
    traced = run.experimental_get_tracing_count()
    for scale in (0.8, 1.25):  # two classifiers' blocks: different weights, one trace
        weights = {name: (np.asarray(kernel * scale, np.float16), np.asarray(bias, np.float16))
                   for name, (kernel, bias) in pretrained_weights(backbone, blocks).items()}
        keras_blocks = UpperBlocks(blocks, shape, weights, precision)
        served = keras_blocks.served()
        assert served.parameters() == keras_blocks.parameters()
        # held in the compute dtype: 4 bytes a weight in float32, 2 in bfloat16
        assert served.nbytes == (4 if precision == "float32" else 2) * served.parameters()
        expected = keras_blocks.features(tf.constant(activations)).numpy()
        magnitude = np.abs(expected).max()
        np.testing.assert_allclose(served.predict_features(activations), expected,
                                   rtol=tolerance, atol=tolerance * magnitude)
        np.testing.assert_allclose(served.predict_features(activations[:2]), expected[:2],
                                   rtol=tolerance, atol=tolerance * magnitude)
        if blocks == 1:  # gap(block4_pool) is the input's own mean: no rounding to bfloat16
            np.testing.assert_allclose(served.predict_features(activations)[:, :512],
                                       activations.astype(np.float32).mean(axis=(1, 2)),
                                       rtol=1e-3, atol=1e-4)
        if precision == "float32":
            for name, (kernel, bias) in served.weights(np.float32).items():
                np.testing.assert_array_equal(kernel, weights[name][0].astype(np.float32))
    assert run.experimental_get_tracing_count() - traced <= 1


def test_activations_spill_to_a_memory_mapped_file_past_the_budget(backbone, data):
    images, _ = data
    cache = cache_activations(images, backbone, 1, views=2, augmentation=Augmentation(),
                              rng=np.random.default_rng(0), memory_budget_bytes=1024)
    assert cache.spilled and isinstance(cache.array, np.memmap)
    assert cache.array.shape == (24, 3, *backbone.activation_shape(BLOCKS[1][0]))
    in_memory = cache_activations(images, backbone, 1, views=2, augmentation=Augmentation(),
                                  rng=np.random.default_rng(0))
    assert not in_memory.spilled
    np.testing.assert_array_equal(cache.array, in_memory.array)  # same seed, same views
    cache.close()


def test_the_frozen_blocks_run_once_per_image_and_view(backbone, data):
    images, _ = data
    before = backbone.passes
    cache_activations(images, backbone, 1, views=3, augmentation=Augmentation(),
                      rng=np.random.default_rng(0))
    assert backbone.passes - before == len(images) * 4


def _fit(backbone, data, config):
    images, labels = data
    cache = cache_activations(images, backbone, config.blocks, views=1,
                              augmentation=Augmentation(), rng=np.random.default_rng(0))
    head = heads.build_head(heads.HeadSpec(), 2048, 2)
    head.get_layer("head_standardize").adapt(backbone.features(images))
    train = cache.array[:16].reshape(-1, *cache.array.shape[2:])
    # NB: validated on training images, so that training lowers val_loss and restore-best keeps
    # a trained epoch (on 8 held-out noise images the warm start would win)
    return fine_tune(train, np.repeat(labels[:16], 2), cache.array[:16, 0], labels[:16], head,
                     backbone, config), head


def test_fine_tuning_moves_the_blocks_within_the_tether_and_keeps_the_warm_start(backbone, data):
    before = backbone.model.get_layer("block5_conv1").get_weights()[0].copy()
    result, head = _fit(backbone, data, FineTuneConfig(max_epochs=2, learning_rate=1e-5, batch_size=4))
    assert set(result.relative_shift) == set(BLOCKS[1][1])
    assert all(0 < shift < 0.5 for shift in result.relative_shift.values())
    assert result.history[0]["epoch"] == 0  # the warm start is scored first
    # restore-best: never worse than the warm start, but for the float16 rounding of the
    # stored blocks (which best_val_loss is measured with)
    assert result.best_val_loss <= result.history[0]["val_loss"] + 5e-3
    # the shared backbone and the frozen head are untouched
    np.testing.assert_array_equal(backbone.model.get_layer("block5_conv1").get_weights()[0], before)
    assert result.head is not head


def test_a_stronger_l2_sp_keeps_the_blocks_closer_to_the_pretrained_weights(backbone, data):
    loose, _ = _fit(backbone, data, FineTuneConfig(max_epochs=2, patience=5, learning_rate=1e-5, batch_size=4,
                                                   l2_sp=0.0))
    tight, _ = _fit(backbone, data, FineTuneConfig(max_epochs=2, patience=5, learning_rate=1e-5, batch_size=4,
                                                   l2_sp=1e4))
    assert sum(tight.relative_shift.values()) < sum(loose.relative_shift.values())


def test_trained_blocks_round_trip_as_float16_without_pickles(backbone, data):
    result, _ = _fit(backbone, data, FineTuneConfig(max_epochs=1))
    blocks, weights = load_blocks(serialize_blocks(result.upper.weights()))
    assert blocks == 1 and all(k.dtype == np.float16 for k, _ in weights.values())
    for name, (kernel, bias) in result.upper.weights().items():
        np.testing.assert_array_equal(weights[name][0], kernel)
    with pytest.raises(ValueError, match="not a fine-tuned block file"):
        load_blocks(serialize_blocks({"block1_conv1": weights["block5_conv1"]}))


def test_a_mixed_serving_pass_equals_each_classifiers_own_path(backbone, data):
    """Frozen rows get the backbone's features; fine-tuned rows (one and two blocks) get what
    their own blocks give on the float16 activations they were trained on."""
    from models.finetune import mixed_pass

    images, _ = data
    images = images[:6]
    one = ServedBlocks(1, backbone.activation_shape("block4_pool"),
                       {k: (a * 1.1, b) for k, (a, b) in pretrained_weights(backbone, 1).items()})
    two = ServedBlocks(2, backbone.activation_shape("block3_pool"),
                       {k: (a * 0.9, b) for k, (a, b) in pretrained_weights(backbone, 2).items()})
    uppers = [None, one, two, one, None, two]
    mixed = mixed_pass(backbone, images, uppers)
    frozen = backbone.features(images)
    own = {id(one): one.predict_features(backbone.activations(images, "block4_pool")),
           id(two): two.predict_features(backbone.activations(images, "block3_pool"))}
    for row, upper in enumerate(uppers):
        expected = frozen[row] if upper is None else own[id(upper)][row]
        np.testing.assert_allclose(mixed[row], expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(mixed[1], frozen[1])  # the fine-tuned rows really differ


# ---------------------------------------------------------------- the fine-tuning stage


def _toy(per_label=8):
    from tests.helpers import COLOURS, image_bytes

    encoded, labels = [], []
    for index, label in enumerate(("red", "blue")):
        for i in range(per_label):
            encoded.append(image_bytes(COLOURS[label], seed=1000 * index + i))
            labels.append(index)
    return encoded, np.array(labels)


def _frozen_then_stage(backbone, fine_tune, *, l2=10.0, budget=600.0, **stage):
    """The frozen stage (a fixed, strongly regularised linear head: it leaves room) and then
    the fine-tuning stage on the same images."""
    from models import training
    from models.options import AugmentationOptions, HeadOptions
    from models.preprocessing import load_image

    encoded, labels = _toy()
    config = training.TrainingConfig(
        augmentation=AugmentationOptions(views=1), fine_tune=fine_tune,
        head=HeadOptions(hidden_units=0, dropout=0.0, l2=l2), fine_tune_budget_s=budget)
    frozen_stages = [stage for stage in training.STAGES if stage[0] != "fine_tuned"]
    frozen = training.train_classifier(encoded, labels, ["red", "blue"], backbone, config,
                                       stages=frozen_stages)
    pixels = np.stack([load_image(data, backbone.image_size) for data in encoded])
    from models.finetune import fine_tune_stage

    from models.features import image_hash

    # NB: with the images' hashes the stage draws the frozen stages' views, as in training
    stage.setdefault("hashes", [image_hash(data) for data in encoded])
    return frozen, fine_tune_stage(pixels, labels, ["red", "blue"], frozen, backbone, config,
                                   **stage)


def test_the_fine_tuning_option_is_declared_once_and_validated():
    from pydantic import ValidationError

    from models.options import FineTuneOptions, TrainingOptions

    assert TrainingOptions().fine_tune == "auto"
    assert TrainingOptions(fine_tune="off").fine_tune == "off"
    given = TrainingOptions.model_validate({"fine_tune": {"blocks": 2, "l2_sp": 0.1}}).fine_tune
    assert given == FineTuneOptions(blocks=2, l2_sp=0.1)
    for bad in ({"blocks": 3}, {"learning_rate": 0}, {"l2_sp": -1}, {"max_epochs": 0},
                {"typo": 1}, "sometimes"):
        with pytest.raises(ValidationError):
            TrainingOptions.model_validate({"fine_tune": bad})


def test_an_explicit_fine_tuning_trains_the_blocks_and_reports_them(backbone):
    from models.progress import Progress

    seen: list[Progress] = []
    # budget 0: an explicit option runs anyway, scored on one split (the first fold)
    frozen, result = _frozen_then_stage(
        backbone, {"blocks": 1, "max_epochs": 3, "patience": 3}, budget=0.0,
        on_progress=seen.append)
    report = result.report
    assert report["fine_tuning"]["folds"] == 1
    assert report["fine_tuning"]["split"].startswith("one split")
    assert report["fine_tuning"]["held_out_images"] == int((frozen.selection.folds == 0).sum())
    assert result.stage == "fine_tuned", report["fine_tuning"]["reason"]
    assert report["fine_tuning"]["kept"] and report["fine_tuning"]["improvement"] > 0
    assert report["fine_tuning"]["val_loss"] < report["fine_tuning"]["frozen_val_loss"]
    assert set(result.upper) == set(BLOCKS[1][1])
    assert all(kernel.dtype == np.float16 for kernel, _ in result.upper.values())
    conv = sum(k.size + b.size for k, b in result.upper.values())
    assert report["d"] == frozen.report["d"] + conv == 2048 * 2 + 2 + conv
    assert report["fine_tuned"] == result.fine_tuned
    assert set(result.fine_tuned["relative_shift"]) == set(BLOCKS[1][1])
    assert all(0 < s < 1 for s in result.fine_tuned["relative_shift"].values())
    assert any("L2-SP" in note and "effective hypothesis space" in note
               for note in report["diagnosis"])
    assert {p.stage for p in seen} == {"fine_tuning"}
    assert any(p.epoch for p in seen) and any(p.images_done == 16 for p in seen)
    # the served blocks are the refit's: they give other features than the frozen backbone
    upper = ServedBlocks(1, backbone.activation_shape("block4_pool"), result.upper)
    images = np.zeros((2, 32, 32, 3), np.uint8) + 90
    assert not np.allclose(upper.predict_features(backbone.activations(images, "block4_pool")),
                           backbone.features(images), atol=1e-3)


def test_auto_says_why_it_skipped(backbone):
    frozen, over = _frozen_then_stage(backbone, "auto", budget=0.0)
    assert over is frozen and over.stage != "fine_tuned" and over.report["fine_tuned"] is None
    assert not over.report["fine_tuning"]["ran"]
    assert over.report["fine_tuning"]["reason"].startswith("no budget")
    assert over.report["fine_tuning"]["estimated_s"] > 0
    _, small = _frozen_then_stage(backbone, "auto", budget=0.01)
    assert small.report["fine_tuning"]["reason"].startswith("over budget")
    _, no_room = _frozen_then_stage(backbone, "auto", l2=1e-4)
    assert no_room.report["validation"]["accuracy"] == 1.0
    assert no_room.report["fine_tuning"]["reason"].startswith("no room"), \
        no_room.report["fine_tuning"]
    _, off = _frozen_then_stage(backbone, "off")
    assert off.report["fine_tuning"] == {"ran": False, "reason": 'fine_tune is "off"'}


def test_auto_tries_the_candidates_the_budget_allows_and_cancels(backbone):
    from models.progress import Cancelled

    frozen, result = _frozen_then_stage(backbone, "auto")
    tuning = result.report["fine_tuning"]
    tried = tuning["tried"]
    assert len(tried) == 3 and tuning["ran"]
    assert [t["l2_sp"] for t in tried] == [0.01, 0.1, 0.01]
    # the budget covers every fold: each candidate is cross-validated on all 16 images, each
    # scored by the run that did not train on it, against the frozen head's out-of-fold loss
    k = frozen.selection.k
    assert k > 1 and tuning["folds"] == k and tuning["held_out_images"] == 16
    assert tuning["split"].startswith(f"cross-validated on {k} of")
    assert all(len(t["best_epochs"]) == k for t in tried)
    frozen_loss = -np.log(np.clip(
        frozen.selection.result.out_of_fold[np.arange(16), _toy()[1]], 1e-7, None))
    assert tuning["frozen_val_loss"] == pytest.approx(frozen_loss.mean(), abs=1e-4)
    calls = []

    def stop_after_some():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        _frozen_then_stage(backbone, {"max_epochs": 2}, should_stop=stop_after_some)


def test_the_budget_buys_folds_after_the_first_one():
    from models.finetune import estimate_seconds, scored_folds
    from models.options import FineTuneOptions

    option = FineTuneOptions(max_epochs=2)
    one, two = (estimate_seconds(option, 100, 0, 1.0, 5, scored) for scored in (1, 2))
    assert two > one  # each scored fold adds a fit on four fifths of the rows
    assert scored_folds([option], 100, 0, 1.0, 5, budget_s=0.0, spent_s=10.0) == 1
    assert scored_folds([option], 100, 0, 1.0, 5, budget_s=10.0 + two, spent_s=10.0) == 2
    assert scored_folds([option, option], 100, 0, 1.0, 5, budget_s=10.0 + two,
                        spent_s=10.0) == 1  # two candidates cost twice as much per fold
    assert scored_folds([option], 100, 0, 1.0, 5, budget_s=1e9, spent_s=10.0) == 5
