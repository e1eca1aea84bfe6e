"""Fine-tuning the deepest blocks with L2-SP on cached activations (random weights, 32 px)."""

import numpy as np
import pytest
import tensorflow as tf

from models import heads
from models.augmentation import Augmentation
from models.finetune import (BLOCKS, FineTuneConfig, UpperBlocks, cache_activations, fine_tune,
                             load_blocks, pretrained_weights, serialize_blocks)


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
    return fine_tune(train, np.repeat(labels[:16], 2), cache.array[16:, 0], labels[16:], head,
                     backbone, config), head


def test_fine_tuning_moves_the_blocks_within_the_tether_and_keeps_the_warm_start(backbone, data):
    before = backbone.model.get_layer("block5_conv1").get_weights()[0].copy()
    result, head = _fit(backbone, data, FineTuneConfig(max_epochs=3, learning_rate=1e-3))
    assert set(result.relative_shift) == set(BLOCKS[1][1])
    assert all(0 < shift < 0.5 for shift in result.relative_shift.values())
    assert result.history[0]["epoch"] == 0  # the warm start is scored first
    assert result.best_val_loss <= result.history[0]["val_loss"] + 1e-3
    # the shared backbone and the frozen head are untouched
    np.testing.assert_array_equal(backbone.model.get_layer("block5_conv1").get_weights()[0], before)
    assert result.head is not head


def test_a_stronger_l2_sp_keeps_the_blocks_closer_to_the_pretrained_weights(backbone, data):
    loose, _ = _fit(backbone, data, FineTuneConfig(max_epochs=3, patience=5, learning_rate=1e-3,
                                                   l2_sp=0.0))
    tight, _ = _fit(backbone, data, FineTuneConfig(max_epochs=3, patience=5, learning_rate=1e-3,
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
    one = UpperBlocks(1, backbone.activation_shape("block4_pool"),
                      {k: (a * 1.1, b) for k, (a, b) in pretrained_weights(backbone, 1).items()})
    two = UpperBlocks(2, backbone.activation_shape("block3_pool"),
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
