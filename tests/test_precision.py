"""The backbone's precision: the automatic choice per device, the precision in the backbone's
identity and the classifier's record, and classifiers served in the precision they were trained in
by a process that computes in another.

Devices are described by real /proc/cpuinfo text of each kind (trimmed) and GPU descriptions;
the backbones are real (random weights, 32 px)."""

import io
import time

import numpy as np
import pytest

from models.precision import (BF16_CPU_FLAGS, Choice, Gpu, choose, cpu_flags, onednn_enabled,
                              policy_scope, resolve, visible_gpus)
from tests.helpers import CollectingRunner, dataset_zip, image_bytes

COMMON = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx "
          "fxsr sse sse2 ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology "
          "cpuid pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave "
          "avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch fsgsbase bmi1 avx2 smep bmi2 "
          "erms invpcid rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 xsaves")
AVX512 = "avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl avx512vbmi avx512_vnni"


def cpuinfo(flags: str, processors: int = 2, model: str = "Intel(R) Xeon(R) Processor",
            key: str = "flags") -> str:
    """/proc/cpuinfo as Linux writes it: one block per logical processor."""
    return "\n\n".join(
        f"processor\t: {n}\nvendor_id\t: GenuineIntel\nmodel name\t: {model}\n"
        f"{key}\t\t: {flags}\nvmx flags\t: vnmi preemption_timer invvpid ept_x_only\n"
        f"bugs\t\t: spectre_v1 spectre_v2\nbogomips\t: 4200.00\n" for n in range(processors))


#: Sapphire Rapids (this project's bfloat16 machines): AVX-512 BF16 and AMX.
SAPPHIRE_RAPIDS = cpuinfo(f"{COMMON} {AVX512} avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8")
#: Cooper Lake / Zen 4: AVX-512 BF16, no AMX.
COOPER_LAKE = cpuinfo(f"{COMMON} {AVX512} avx512_bf16")
#: Ice Lake / Skylake-SP: AVX-512, but no bfloat16 instructions.
ICE_LAKE = cpuinfo(f"{COMMON} {AVX512}")
#: AMD EPYC Zen 2 (this project's AVX2-only machines).
EPYC_AVX2 = cpuinfo(COMMON.replace("sha_ni", "sha_ni clzero xsaveerptr rdpru wbnoinvd"),
                    model="AMD EPYC 7B12")
#: arm64 (Graviton 3): `Features`, and no x86 flags.
GRAVITON = cpuinfo("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                   "asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm "
                   "dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng",
                   key="Features")


# ---------------------------------------------------------------- the choice, per device


@pytest.mark.parametrize("text, policy, reason", [
    (SAPPHIRE_RAPIDS, "mixed_bfloat16", "auto: avx512_bf16, amx_bf16"),
    (COOPER_LAKE, "mixed_bfloat16", "auto: avx512_bf16"),
    (ICE_LAKE, "float32", "auto: no avx512_bf16 or amx_bf16 on this CPU"),
    (EPYC_AVX2, "float32", "auto: no avx512_bf16 or amx_bf16 on this CPU"),
    (GRAVITON, "float32", "auto: no avx512_bf16 or amx_bf16 on this CPU"),
])
def test_auto_picks_bfloat16_exactly_on_cpus_with_native_bfloat16(text, policy, reason):
    assert choose("auto", cpu_flags=cpu_flags(text)) == Choice(policy, reason)


def test_cpuinfo_flags_are_those_every_processor_has():
    flags = cpu_flags(SAPPHIRE_RAPIDS)
    assert {"avx2", "avx512f", "avx512_bf16", "amx_bf16"} <= flags
    assert "vnmi" not in flags and "spectre_v1" not in flags  # `vmx flags` and `bugs` lines
    assert cpu_flags(GRAVITON) >= {"asimd", "bf16"}
    # a processor without it (heterogeneous cores, or a hypervisor that masks it) decides
    mixed = SAPPHIRE_RAPIDS + "\n\n" + ICE_LAKE.replace("processor\t: 0", "processor\t: 2")
    assert not set(BF16_CPU_FLAGS) & cpu_flags(mixed)
    assert choose("auto", cpu_flags=cpu_flags(mixed)).policy == "float32"
    assert cpu_flags("processor\t: 0\nmodel name\t: x\n") is None


def test_unknown_cpu_flags_and_onednn_off_give_float32():
    assert choose("auto", cpu_flags=None) == Choice(
        "float32", "auto: CPU flags unknown (no /proc/cpuinfo)")
    off = choose("auto", cpu_flags=cpu_flags(SAPPHIRE_RAPIDS), onednn=False)
    assert off.policy == "float32" and "TF_ENABLE_ONEDNN_OPTS=0" in off.reason
    assert onednn_enabled({}) and onednn_enabled({"TF_ENABLE_ONEDNN_OPTS": "1"})
    assert not onednn_enabled({"TF_ENABLE_ONEDNN_OPTS": "0"})
    assert not onednn_enabled({"TF_ENABLE_ONEDNN_OPTS": "False"})


@pytest.mark.parametrize("gpu, policy", [
    (Gpu("NVIDIA A100-SXM4-80GB", (8, 0)), "mixed_bfloat16"),
    (Gpu("NVIDIA L4", (8, 9)), "mixed_bfloat16"),
    (Gpu("NVIDIA H200", (9, 0)), "mixed_bfloat16"),
    (Gpu("Tesla T4", (7, 5)), "float32"),
    (Gpu("Tesla V100-SXM2-16GB", (7, 0)), "float32"),
    (Gpu("some GPU", None), "float32"),
])
def test_on_a_gpu_its_compute_capability_decides_whatever_the_cpu(gpu, policy):
    for text in (EPYC_AVX2, SAPPHIRE_RAPIDS):
        choice = choose("auto", cpu_flags=cpu_flags(text), gpus=[gpu, Gpu("second", (9, 0))])
        assert choice.policy == policy and gpu.name in choice.reason


def test_an_explicit_setting_forces_its_policy_on_any_device():
    for policy in ("float32", "mixed_bfloat16", "mixed_float16"):
        for text in (EPYC_AVX2, SAPPHIRE_RAPIDS):
            assert choose(policy, cpu_flags=cpu_flags(text)) == Choice(policy, "set explicitly")
        assert choose(policy, cpu_flags=None, gpus=[Gpu("T4", (7, 5))]).policy == policy
        assert resolve(policy) == Choice(policy, "set explicitly")
    with pytest.raises(ValueError, match="precision must be one of"):
        choose("bfloat16", cpu_flags=None)
    with pytest.raises(ValueError):
        Choice("float64", "no")
    assert Choice("mixed_bfloat16", "x").compute_dtype == "bfloat16"


@pytest.mark.skipif(bool(visible_gpus()), reason="on a GPU machine the GPU decides")
def test_resolve_reads_the_cpuinfo_it_is_given(tmp_path):
    for text, policy in ((SAPPHIRE_RAPIDS, "mixed_bfloat16"), (EPYC_AVX2, "float32")):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        assert resolve("auto", cpuinfo=path, environ={}).policy == policy
    assert resolve("auto", cpuinfo=tmp_path / "missing", environ={}).policy == "float32"
    path.write_text(SAPPHIRE_RAPIDS)
    assert resolve("auto", cpuinfo=path, environ={"TF_ENABLE_ONEDNN_OPTS": "0"}).policy == \
        "float32"


def test_the_setting_defaults_to_auto_and_refuses_other_values(monkeypatch):
    from pydantic import ValidationError

    from service.config import Settings

    monkeypatch.delenv("HEADSTART_PRECISION", raising=False)
    assert Settings().precision == "auto"
    monkeypatch.setenv("HEADSTART_PRECISION", "mixed_bfloat16")
    assert Settings().precision == "mixed_bfloat16"
    monkeypatch.setenv("HEADSTART_PRECISION", "bfloat16")
    with pytest.raises(ValidationError):
        Settings()


def test_a_policy_scope_applies_to_its_thread_and_is_undone():
    import keras

    before = keras.config.dtype_policy().name
    with policy_scope("mixed_bfloat16"):
        layer = keras.layers.Dense(2)
        layer.build((None, 3))
        assert layer.compute_dtype == "bfloat16" and layer.kernel.dtype == "float32"
    assert keras.config.dtype_policy().name == before


# ---------------------------------------------------------------- the backbone in a precision


@pytest.fixture(scope="module")
def bf16_backbone():
    from models.backbone import load_backbone

    return load_backbone("random", 32, seed=0, precision=Choice("mixed_bfloat16", "auto: test"))


def pixels(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3)).astype(np.uint8)


def test_the_precision_and_its_reason_are_in_the_identity(backbone, bf16_backbone):
    assert bf16_backbone.identity.as_dict()["precision"] == "mixed_bfloat16"
    assert bf16_backbone.identity.as_dict()["precision_reason"] == "auto: test"
    assert backbone.identity.as_dict()["precision"] == "float32"
    assert bf16_backbone.identity.fingerprint == backbone.identity.fingerprint
    features = bf16_backbone.features(pixels(3))
    assert features.dtype == np.float32 and np.isfinite(features).all()


def test_a_copy_in_another_precision_computes_as_one_built_in_it(backbone, bf16_backbone):
    copy = bf16_backbone.in_precision("float32")
    assert copy.precision == "float32"
    assert copy.identity.fingerprint == backbone.identity.fingerprint
    np.testing.assert_allclose(copy.features(pixels(4)), backbone.features(pixels(4)),
                               rtol=1e-5, atol=1e-5)
    assert bf16_backbone.precision == "mixed_bfloat16"  # the original is unchanged


# ---------------------------------------------------------------- a process of one precision


def test_the_holder_serves_another_precision_through_a_copy_loaded_once(backbone, bf16_backbone):
    from service.serving.backbone import BackboneHolder

    holder = BackboneHolder(lambda: bf16_backbone)
    holder.start()
    assert holder.get(wait=True) is bf16_backbone
    assert holder.precisions == ["mixed_bfloat16"]
    assert holder.get(precision="mixed_bfloat16") is bf16_backbone
    float32 = holder.get(precision="float32")
    assert float32.precision == "float32" and holder.get(precision="float32") is float32
    assert holder.precisions == ["mixed_bfloat16", "float32"]
    assert holder.identity().precision == "mixed_bfloat16"
    images = pixels(5, seed=1)
    np.testing.assert_allclose(holder.features(images, precision="float32"),
                               backbone.features(images), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(holder.features(images),
                               bf16_backbone.features(images), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="unknown precision"):
        holder.get(precision="float64")


def test_one_queue_never_mixes_backbones_in_a_pass(backbone, bf16_backbone):
    import threading

    from service.serving.batching import FeatureBatcher

    class Recording:
        def __init__(self, inner):
            self.inner, self.passes = inner, []

        def features(self, images):
            self.passes.append(len(images))
            return self.inner.features(images)

    first, second = Recording(bf16_backbone), Recording(backbone)
    batcher = FeatureBatcher(first, max_batch=32, max_wait_s=0.2, max_queued=256,
                             timeout_s=30).start()
    requests = [(pixels(1 + i % 3, seed=i), second if i % 2 else None) for i in range(10)]
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, batcher.features(requests[i][0], backbone=requests[i][1]))) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sum(first.passes) + sum(second.passes) == sum(len(p) for p, _ in requests)
    assert len(first.passes) < 5 or len(second.passes) < 5  # shared passes
    for i, (images, chosen) in enumerate(requests):
        expected = (chosen.inner if chosen else bf16_backbone).features(images)
        np.testing.assert_allclose(results[i], expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- through the API


FAST = {"max_epochs": 10, "patience": 3, "augmentation": {"views": 0},
        "head": {"hidden_units": 0, "dropout": 0.1, "l2": 0.001}}


def _app(root, precision: str):
    from service.app import create_app
    from service.config import Settings

    app = create_app(Settings(store=str(root / "store"), backbone_weights="random", image_size=32,
                              weights_cache=root / "cache", precision=precision))
    client = app.test_client()
    deadline = time.monotonic() + 60
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json
        time.sleep(0.1)
    return app, client


def _train(client) -> dict:
    import json

    response = client.post("/v1/classifiers", content_type="multipart/form-data", data={
        "dataset": (io.BytesIO(dataset_zip(6)), "d.zip"), "options": json.dumps(FAST)})
    assert response.status_code == 202, response.json
    deadline = time.monotonic() + 120
    while (body := client.get(f"/v1/classifiers/{response.json['id']}").json)["status"] != "ready":
        assert body["status"] in ("queued", "training") and time.monotonic() < deadline, body
        time.sleep(0.1)
    return body


def _expected_scores(backbone, app, record_id: str, image: bytes) -> np.ndarray:
    from models import calibration
    from models.heads import HeadSpec, load_head
    from models.prediction import class_scores
    from models.preprocessing import load_image

    store = app.extensions["headstart"].store
    record = store.load_record(record_id)
    head = load_head(HeadSpec(**record.head.model_dump()), backbone.feature_dim,
                     len(record.labels), store.load_head(record))
    raw = class_scores(backbone, head, load_image(image, 32)[None])
    # NB: predict's scores are calibrated by the head file's temperature
    temperature = app.extensions["headstart"].heads.get(record).trust.temperature
    return calibration.softmax(calibration.logits_from_probabilities(raw), temperature)[0]


def _predict(client, classifier_id: str, image: bytes) -> dict:
    response = client.post(f"/v1/classifiers/{classifier_id}/predict?top_k=2",
                           data={"image": (io.BytesIO(image), "x.png")},
                           content_type="multipart/form-data")
    assert response.status_code == 200, response.json
    return {e["label"]: e["score"] for e in response.json["predictions"][0]["top_k"]}


def test_a_float32_head_served_by_a_bfloat16_process_gets_float32_features(
        tmp_path, backbone, bf16_backbone):
    # A float32 process trains it; the record, the resource and the report say float32.
    old, old_client = _app(tmp_path, "float32")
    trained = _train(old_client)
    assert trained["backbone"]["precision"] == "float32"
    assert trained["backbone"]["precision_reason"] == "set explicitly"
    report = old_client.get(f"/v1/classifiers/{trained['id']}/report").json
    assert report["precision"] == "float32" and report["backbone"]["precision"] == "float32"
    image = image_bytes((200, 40, 40), seed=99)
    served_by_float32 = _predict(old_client, trained["id"], image)

    # A bfloat16 process on the same store serves it through a float32 copy of its backbone.
    new, client = _app(tmp_path, "mixed_bfloat16")
    ready = client.get("/readyz").json
    assert ready["backbone"]["precision"] == "mixed_bfloat16"
    assert ready["precisions"] == ["mixed_bfloat16"]
    scores = _predict(client, trained["id"], image)
    labels = sorted(scores)
    expected = _expected_scores(backbone, new, trained["id"], image)
    np.testing.assert_allclose([scores[label] for label in labels], expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose([scores[label] for label in labels],
                               [served_by_float32[label] for label in labels], rtol=1e-4, atol=1e-6)
    assert client.get("/readyz").json["precisions"] == ["mixed_bfloat16", "float32"]

    # What it trains itself is bfloat16, and is served through its own backbone.
    fresh = _train(client)
    assert fresh["backbone"]["precision"] == "mixed_bfloat16"
    report = client.get(f"/v1/classifiers/{fresh['id']}/report").json
    assert report["precision"] == "mixed_bfloat16"
    own = new.extensions["headstart"].backbone.get()
    scores = _predict(client, fresh["id"], image)
    np.testing.assert_allclose([scores[label] for label in sorted(scores)],
                               _expected_scores(own, new, fresh["id"], image), rtol=1e-4, atol=1e-6)


def test_records_from_before_the_precision_was_stored_are_float32():
    from service.storage.records import Backbone, ClassifierRecord

    record = ClassifierRecord.model_validate({
        "id": "clf_x", "name": "x", "status": "ready", "labels": ["a", "b"],
        "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
        "dataset": {"images": 4, "per_label": {"a": 2, "b": 2}}, "options": {},
        "backbone": {"name": "vgg16", "weights": "random", "image_size": 32}})
    assert record.features_precision == "float32"
    record.backbone = Backbone(name="vgg16", weights="random", image_size=32,
                               precision="mixed_bfloat16")
    assert record.features_precision == "mixed_bfloat16"
    assert record.model_copy(update={"backbone": None}).features_precision == "float32"


def _services(root, backbone):
    from service.config import Settings
    from service.jobs.services import Services
    from service.metrics import Metrics
    from service.serving.backbone import BackboneHolder
    from service.serving.heads import HeadCache
    from service.storage.blobs import LocalBlobStore
    from service.storage.classifiers import ClassifierStore

    holder = BackboneHolder(lambda: backbone)
    holder.start()
    holder.get(wait=True)
    return Services(settings=Settings(store=str(root), backbone_weights="random", image_size=32),
                    store=ClassifierStore(LocalBlobStore(root)), backbone=holder,
                    heads=HeadCache(lambda record: None, capacity=1), runner=CollectingRunner(),
                    metrics=Metrics())


def test_a_worker_of_another_precision_trains_in_the_classifiers(tmp_path, backbone,
                                                                 bf16_backbone):
    """The API that created the classifier (and serves it) decides its precision; a training
    worker that computes in another trains it through a copy in the classifier's."""
    from models.options import TrainingOptions
    from service.jobs.classifiers import create_classifier
    from service.jobs.training import run_training_job

    api, worker = _services(tmp_path, bf16_backbone), _services(tmp_path, backbone)
    created = create_classifier(api, io.BytesIO(dataset_zip(6)),
                                TrainingOptions.model_validate(FAST))
    assert created.backbone.precision == "mixed_bfloat16"
    run_training_job(worker, created.id)
    record = worker.store.load_record(created.id)
    assert record.status == "ready" and record.features_precision == "mixed_bfloat16"
    import json

    assert json.loads(worker.store.load_report(record))["precision"] == "mixed_bfloat16"
    assert worker.backbone.precisions == ["float32", "mixed_bfloat16"]


def test_the_configured_backbone_computes_in_the_automatic_choice(tmp_path):
    from service.config import Settings
    from service.serving.backbone import load_configured_backbone

    loaded = load_configured_backbone(Settings(backbone_weights="random", image_size=32,
                                               weights_cache=tmp_path, precision="auto"))
    choice = resolve("auto")
    assert (loaded.precision, loaded.identity.precision_reason) == (choice.policy, choice.reason)
    assert loaded.identity.precision_reason.startswith("auto: ")
