"""The shared batching queue in front of the backbone, with the real (random, 32 px) backbone;
and what happens when its thread stops: readiness says so, and a new thread takes over."""

import threading
import time

import numpy as np
import pytest

from service.serving.batching import FeatureBatcher, Overloaded
from service.errors import ServiceUnavailable

RNG = np.random.default_rng(0)


def images(count: int) -> np.ndarray:
    return RNG.integers(0, 256, (count, 32, 32, 3)).astype(np.uint8)


class Gate:
    """The real backbone behind a gate the test opens, to hold passes back. `held` is set once
    a pass is waiting at the gate; `held_sizes` are the sizes of passes that reached it."""

    def __init__(self, backbone):
        self.backbone, self.open, self.held = backbone, threading.Event(), threading.Event()
        self.held_sizes: list[int] = []
        self.batch_sizes: list[int] = []

    def features(self, pixels):
        self.held_sizes.append(len(pixels))
        self.held.set()
        assert self.open.wait(60)
        self.batch_sizes.append(len(pixels))
        return self.backbone.features(pixels)


def batcher(backbone, start: bool = True, **overrides) -> FeatureBatcher:
    options = {"max_batch": 32, "max_wait_s": 0.0, "max_queued": 256, "timeout_s": 10.0}
    shared = FeatureBatcher(backbone, **{**options, **overrides})
    return shared.start() if start else shared


def wait_until(condition, timeout: float = 30) -> None:
    """Waits for a state of the batcher's queue, which sends no event of its own."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the batcher never got there"
        time.sleep(0.005)


def in_thread(call, *args) -> tuple[threading.Thread, list]:
    """Runs call(*args) on a thread; the list gets its result or the exception it raised."""
    outcome: list = []

    def run():
        try:
            outcome.append(call(*args))
        except Exception as error:  # the test asserts on it
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_concurrent_requests_share_passes_and_get_their_own_features(backbone):
    gate = Gate(backbone)
    shared = batcher(gate)
    requests = [images(1 + i % 3) for i in range(12)]
    total = sum(len(pixels) for pixels in requests)
    running = [in_thread(shared.features, pixels) for pixels in requests]
    # One pass is held at the gate; every other request waits in the queue behind it.
    assert gate.held.wait(30)
    wait_until(lambda: sum(gate.held_sizes) + shared.queued == total)
    gate.open.set()
    for thread, _ in running:
        thread.join(60)
    assert shared.batches < len(requests)
    assert sum(gate.batch_sizes) == total  # no padding
    for pixels, (_, outcome) in zip(requests, running):
        np.testing.assert_allclose(outcome[0], backbone.features(pixels), rtol=1e-4, atol=1e-4)


def test_a_request_larger_than_a_batch_is_split(backbone):
    pixels = images(70)
    features = batcher(backbone, max_batch=32).features(pixels)
    assert features.shape == (70, backbone.feature_dim)
    np.testing.assert_allclose(features, backbone.features(pixels), rtol=1e-4, atol=1e-4)


def test_a_full_queue_refuses_at_once_with_retry_after(backbone):
    gate = Gate(backbone)
    shared = batcher(gate, max_queued=8)
    first = in_thread(shared.features, images(4))
    assert gate.held.wait(30)  # one in the held pass
    waiting = [in_thread(shared.features, images(4)) for _ in range(2)]
    wait_until(lambda: shared.queued == 8)  # and two in the queue: full

    # Refused before it waits at all: were it queued, it would wait for the closed gate and
    # fail with a timeout, not Overloaded.
    with pytest.raises(Overloaded) as refused:
        shared.features(images(1))
    assert refused.value.status == 503 and refused.value.headers["Retry-After"]
    gate.open.set()
    for thread, outcome in [first, *waiting]:
        thread.join(60)
        assert outcome[0].shape == (4, backbone.feature_dim)
    shared.features(images(1))  # drained: accepted again


def test_a_request_waits_at_most_its_timeout(backbone):
    gate = Gate(backbone)
    shared = batcher(gate, timeout_s=0.3)
    blocker, blocked = in_thread(shared.features, images(1))
    assert gate.held.wait(30)  # its pass is held at the gate

    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="within 0.3 s"):
        shared.features(images(2))
    assert time.monotonic() - started < 5  # its timeout, plus a loaded machine's scheduling
    assert shared.queued == 0  # the abandoned request left the queue
    gate.open.set()
    blocker.join(30)
    assert isinstance(blocked[0], ServiceUnavailable)  # the one inside the held pass timed out


def test_a_failed_pass_fails_its_requests_and_the_next_pass_works(backbone):
    class Flaky:
        calls = 0

        def features(self, pixels):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("device lost")
            return backbone.features(pixels)

    shared = batcher(Flaky())
    with pytest.raises(RuntimeError, match="device lost"):
        shared.features(images(1))
    assert shared.features(images(2)).shape == (2, backbone.feature_dim)


def test_no_batch_size_retraces_the_compiled_backbone(backbone):
    shared = batcher(backbone)
    traces = backbone._compiled.experimental_get_tracing_count()
    for count in (1, 3, 7, 32, 45):
        shared.features(images(count))
    assert backbone._compiled.experimental_get_tracing_count() == max(traces, 1)


def test_each_request_s_head_is_applied_to_its_own_features(backbone):
    shared = batcher(backbone)
    pixels = images(3)
    doubled = shared.features(pixels, lambda features: features * 2)
    np.testing.assert_allclose(doubled, backbone.features(pixels) * 2, rtol=1e-4, atol=1e-4)


def test_a_failing_head_fails_only_its_request(backbone):
    shared = batcher(backbone)

    def broken(features):
        raise ValueError("head does not fit")

    with pytest.raises(ValueError, match="does not fit"):
        shared.features(images(1), broken)
    assert shared.features(images(1)).shape == (1, backbone.feature_dim)


# ---------------------------------------------------------------- the batching thread itself

class AbandonWhileGathering(threading.Condition):
    """The batcher's condition: the first time the batching thread waits for stragglers (a wait
    with a timeout, inside `_take_batch`), `during()` runs first, with the lock held."""

    def __init__(self):
        super().__init__()
        self.during = lambda: None
        self.fired = threading.Event()

    def wait(self, timeout=None):
        if timeout is not None and not self.fired.is_set():
            self.fired.set()
            self.during()
        return super().wait(timeout)


def test_requests_that_all_time_out_while_a_pass_gathers_do_not_stop_the_batcher(backbone):
    """Every request waiting gives up while the pass gathers stragglers: the pass is empty. It
    used to reach np.concatenate([]) outside the try, which ended the thread for good."""
    shared = batcher(backbone, start=False, max_wait_s=0.05, timeout_s=0.5)
    condition = AbandonWhileGathering()
    shared._cond = condition
    # Exactly what a request that times out does, at the one moment that empties the pass.
    condition.during = lambda: shared._abandon(list(shared._pending))
    shared.start()

    with pytest.raises(ServiceUnavailable, match="did not finish within 0.5 s"):
        shared.features(images(1))
    assert condition.fired.is_set()
    assert shared.alive
    assert shared.features(images(2)).shape == (2, backbone.feature_dim)


class Fatal(BaseException):
    """Stands for a bug that escapes a pass's error handling (not an `Exception`)."""


class DiesOnce:
    """The real backbone, but its first pass raises `Fatal`."""

    def __init__(self, backbone):
        self.backbone, self.died = backbone, False
        self.image_size, self.feature_dim = backbone.image_size, backbone.feature_dim

    def features(self, pixels):
        if not self.died:
            self.died = True
            raise Fatal("a bug in the batching thread")
        return self.backbone.features(pixels)


def test_a_stopped_batcher_fails_its_requests_at_once_and_says_it_is_not_alive(backbone):
    shared = batcher(DiesOnce(backbone), timeout_s=300)

    with pytest.raises(ServiceUnavailable, match="batching thread stopped .Fatal: a bug"):
        shared.features(images(1))  # at once, not after its 300 s timeout
    assert not shared.alive
    with pytest.raises(ServiceUnavailable, match="batching thread stopped"):
        shared.features(images(1))  # refused before it is queued


def test_readiness_fails_once_for_a_stopped_batcher_which_is_restarted(tmp_path):
    from service.app import create_app
    from service.config import Settings

    app = create_app(Settings(store=str(tmp_path / "store"), backbone_weights="random",
                              image_size=32, weights_cache=tmp_path / "cache"))
    client, holder = app.test_client(), app.extensions["headstart"].backbone
    holder.get(wait=True)
    assert client.get("/readyz").json["checks"]["batcher"] == "ok"
    first = holder._batcher
    first.backbone = DiesOnce(first.backbone)  # its next pass ends the thread

    with pytest.raises(ServiceUnavailable, match="batching thread stopped"):
        holder.features(images(1))
    assert not first.alive
    unready = client.get("/readyz")
    assert unready.status_code == 503
    assert unready.json["checks"]["batcher"] == \
        "restarted: the batching thread had stopped (Fatal: a bug in the batching thread)"
    assert client.get("/readyz").status_code == 200
    assert holder.features(images(2)).shape == (2, holder.get().feature_dim)
    assert holder.batcher_restarts == 1
