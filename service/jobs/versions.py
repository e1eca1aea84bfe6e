"""Versions and aliases: every training run makes a version; aliases name versions, and
`production` is the one predict uses by default.

A version is a job like any other: its own record (the same `ClassifierRecord`, with `version`
set), its own dataset (all of its images: the base version's plus those added, or only those
added), its own job id on the queue. The classifier's versions and aliases are one object of
their own (`ClassifierVersions`), changed by compare-and-set retried on conflict; a training run
never writes it before its final record write, so moving an alias while a version trains cannot
look like a lost lease. Rolling back is moving an alias: the old version's head is still stored,
and predicting with it gives exactly what it gave before.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from collections.abc import Callable
from typing import IO

from models.options import VersionOptions
from service.errors import Conflict, NotFound, ServiceUnavailable, Unprocessable
from service.jobs.classifiers import check_feature_budget, dataset_info, store_and_queue
from service.jobs.datasets import check_counts, read_dataset_zip
from service.jobs.services import Services
from service.storage.archive import Dataset, DatasetImage, SkippedFile
from service.storage.classifiers import PreconditionFailed
from service.storage.records import (ACTIVE_STATUSES, Backbone, ClassifierRecord,
                                     ClassifierVersions, Progress, utc_now)

log = logging.getLogger(__name__)

#: Compare-and-set attempts on the versions object before giving up with a 503.
_TRIES = 8
#: What an alias may be called: it becomes part of a URL and a JSON key, nothing else.
ALIAS_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,39}")
PRODUCTION = "production"


def add_version(services: Services, classifier_id: str, dataset_file: IO[bytes] | None,
                options: VersionOptions) -> ClassifierRecord:
    """Validates the images to add, stores the new version's whole dataset, queues its job.

    Raises:
        NotFound: no such classifier, or no version `options.base`.
        Unprocessable: nothing to train on (`replace` without images), or over a limit.
    """
    backbone = services.backbone.get()  # 503 while the backbone is not loaded
    store = services.store
    store.load_record(classifier_id)  # 404 before the upload is read
    versions = store.load_versions(classifier_id)[0]
    base_version = options.base or versions.production
    if base_version not in versions.versions:
        raise NotFound(f"classifier {classifier_id} has no version {base_version}")
    base = store.load_record(classifier_id, base_version)
    added = read_dataset_zip(dataset_file, services.dataset_limits, complete=False) \
        if dataset_file is not None else None
    if options.replace and added is None:
        raise Unprocessable("replace: true needs a dataset zip: there would be no images",
                            errors=[{"field": "dataset", "message": "missing"}])
    dataset = added if options.replace else _merged(services, base, added)
    _check_limits(services, dataset)
    training_options = options.training_options(base.options)
    check_feature_budget(services, len(dataset.images), training_options, backbone.feature_dim)
    version = _allocate(services, classifier_id)
    now = utc_now()
    record = ClassifierRecord(
        id=classifier_id, version=version, base=None if options.replace else base_version,
        promote=options.promote, name=base.name, status="queued", labels=dataset.labels,
        created_at=now, updated_at=now, dataset=dataset_info(dataset),
        progress=Progress(stage="queued"), backbone=Backbone(**backbone.identity.as_dict()),
        options=training_options)
    store_and_queue(services, record, dataset, undo=lambda: _forget(services, record))
    log.info("classifier %s version %d queued: %d images, labels %s", classifier_id, version,
             len(dataset.images), dataset.labels)
    return record


def _merged(services: Services, base: ClassifierRecord, added: Dataset | None) -> Dataset:
    """The base version's images, then the added ones that it does not hold already (same
    bytes: skipped, so no image is both trained and validated on twice)."""
    with tempfile.TemporaryFile() as archive:
        services.store.load_dataset(base.id, archive, base.version)
        archive.seek(0)
        old = Dataset.from_archive(archive)
    if added is None:
        return Dataset(labels=old.labels, images=old.images, skipped=[])
    held = {_digest(image.data) for image in old.images}
    images: list[DatasetImage] = list(old.images)
    skipped = list(added.skipped)
    for image in added.images:
        digest = _digest(image.data)
        if digest in held:
            skipped.append(SkippedFile(image.path, f"the same image is already in version "
                                                   f"{base.version}'s images"))
            continue
        held.add(digest)
        images.append(image)
    return Dataset(labels=sorted({*old.labels, *added.labels}), images=images, skipped=skipped)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_limits(services: Services, dataset: Dataset) -> None:
    """The limits of one upload hold for a version's whole dataset too."""
    limits = services.dataset_limits
    if len(dataset.labels) > limits.max_labels:
        raise Unprocessable(f"the version would have {len(dataset.labels)} labels; the limit is "
                            f"{limits.max_labels} (HEADSTART_MAX_LABELS)")
    if len(dataset.images) > limits.max_members:
        raise Unprocessable(f"the version would have {len(dataset.images)} images; the limit is "
                            f"{limits.max_members} (HEADSTART_MAX_DATASET_MEMBERS)")
    check_counts(dataset)


def _allocate(services: Services, classifier_id: str) -> int:
    """The next version number, taken by a compare-and-set: never given twice, never reused."""
    def take(versions: ClassifierVersions) -> int:
        versions.last += 1
        versions.versions.append(versions.last)
        return versions.last

    return _change(services, classifier_id, take)


def _forget(services: Services, record: ClassifierRecord) -> None:
    """Undoes a version whose request failed after its number was taken."""
    services.store.delete_version(record)

    def drop(versions: ClassifierVersions) -> None:
        if record.version in versions.versions:
            versions.versions.remove(record.version)

    try:
        _change(services, record.id, drop)
    except (NotFound, ServiceUnavailable):
        log.warning("classifier %s: version %d stays listed without a record", record.id,
                    record.version)


def _change(services: Services, classifier_id: str, change: Callable[[ClassifierVersions], object]):
    """Applies `change` to the versions object by compare-and-set, reading again on conflict;
    returns what `change` returned. `change` may raise to refuse."""
    store = services.store
    for _ in range(_TRIES):
        versions, tag = store.load_versions(classifier_id)
        result = change(versions)
        try:
            store.save_versions(classifier_id, versions, tag)
        except PreconditionFailed:
            continue
        return result
    raise ServiceUnavailable("the classifier's versions keep changing; retry shortly",
                             headers={"Retry-After": "1"})


# ---------------------------------------------------------------- reading


def list_versions(services: Services, classifier_id: str
                  ) -> tuple[list[ClassifierRecord], ClassifierVersions]:
    """Every version's record, newest first, and the versions object."""
    store = services.store
    store.load_record(classifier_id)
    versions = store.load_versions(classifier_id)[0]
    records = []
    for version in sorted(versions.versions, reverse=True):
        try:
            records.append(store.load_record(classifier_id, version))
        except NotFound:  # its number is taken, its record not written yet (or gone)
            continue
    return records, versions


def get_version(services: Services, classifier_id: str, version: int
                ) -> tuple[ClassifierRecord, ClassifierVersions]:
    versions = services.store.load_versions(classifier_id)[0]
    if version not in versions.versions:
        services.store.load_record(classifier_id)  # an unknown classifier is its own 404
        raise NotFound(f"classifier {classifier_id} has no version {version}")
    return services.store.load_record(classifier_id, version), versions


def get_version_report(services: Services, classifier_id: str, version: int) -> bytes:
    record = get_version(services, classifier_id, version)[0]
    if record.status != "ready":
        raise Conflict(f"version {version} is {record.status}; its report exists once its "
                       "first head is served (status ready)")
    return services.store.load_report(record)


def resolve(services: Services, classifier_id: str, version: int | None = None,
            alias: str | None = None) -> ClassifierRecord:
    """The record of the version asked for: by number, by alias, or production's.

    Raises:
        NotFound: no such classifier, version or alias.
    """
    if version is not None and alias is not None:
        raise Unprocessable("ask for a version or an alias, not both",
                            errors=[{"field": "alias", "message": "given with version"}])
    versions = services.store.load_versions(classifier_id)[0]
    if alias is not None:
        if alias not in versions.aliases:
            services.store.load_record(classifier_id)
            raise NotFound(f"classifier {classifier_id} has no alias {alias!r}")
        version = versions.aliases[alias]
    if version is None:
        version = versions.production
    return get_version(services, classifier_id, version)[0]


def record_of_run(services: Services, classifier_id: str, run: str) -> ClassifierRecord | None:
    """The version whose committed head is `run`, or None."""
    records, _ = list_versions(services, classifier_id)
    return next((record for record in records if record.run == run), None)


# ---------------------------------------------------------------- changing


def set_alias(services: Services, classifier_id: str, name: str, version: int
              ) -> ClassifierVersions:
    """Points an alias at a finished version (`production`: predict's default).

    Raises:
        NotFound: no such classifier or version. Conflict: the version is not ready.
    """
    if not ALIAS_PATTERN.fullmatch(name):
        raise Unprocessable(f"an alias is 1-40 lower-case letters, digits, '-' or '_', starting "
                            f"with a letter; not {name[:60]!r}",
                            errors=[{"field": "name", "message": "not an alias name"}])
    record = get_version(services, classifier_id, version)[0]
    if record.status != "ready":
        raise Conflict(f"version {version} is {record.status}; an alias can point only at a "
                       "ready version")

    def point(versions: ClassifierVersions) -> None:
        if version not in versions.versions:
            raise NotFound(f"classifier {classifier_id} has no version {version}")
        versions.aliases[name] = version

    versions = _change_returning_state(services, classifier_id, point)
    log.info("classifier %s: alias %s -> version %d", classifier_id, name, version)
    return versions


def delete_version(services: Services, classifier_id: str, version: int) -> None:
    """Deletes a version's record, images, head and report.

    Raises:
        Conflict: an alias points at it, or its job is queued or training.
    """
    record = get_version(services, classifier_id, version)[0]
    if record.status in ACTIVE_STATUSES:
        raise Conflict(f"version {version} is {record.status}; delete it once it has finished "
                       "(or delete the classifier)")

    def drop(versions: ClassifierVersions) -> None:
        names = versions.aliases_of(version)
        if names:
            raise Conflict(f"version {version} is aliased as {', '.join(names)}; point "
                           f"{'them' if len(names) > 1 else 'it'} at another version first")
        if version in versions.versions:
            versions.versions.remove(version)
        versions.promotions.pop(str(version), None)

    _change(services, classifier_id, drop)
    services.store.delete_version(record)
    services.heads.forget(classifier_id)
    log.info("classifier %s: version %d deleted", classifier_id, version)


def settle_promotion(services: Services, record: ClassifierRecord,
                     comparison: dict | None) -> None:
    """After a version's final write: whether it takes `production`, by its `promote` and the
    comparison made in training (`models.promotion`), recorded in the versions object either way.

    `if_better` moves production only from the version compared against: if someone moved it
    while this one trained, the comparison no longer says anything about the new production.
    """
    comparison = comparison or {}

    def decide(versions: ClassifierVersions) -> None:
        current = versions.production
        if record.promote == "always":
            promoted, reason = True, "promote: always"
        elif record.promote == "never":
            promoted, reason = False, "promote: never"
        elif comparison.get("against") != current:
            promoted, reason = False, (f"production moved to version {current} while this one "
                                       f"trained against version {comparison.get('against')}")
        else:
            promoted = bool(comparison.get("better"))
            reason = comparison.get("reason") or (
                f"{comparison.get('new_correct')} of {comparison.get('images')} right against "
                f"version {current}'s {comparison.get('old_correct')}")
        if promoted:
            versions.aliases[PRODUCTION] = record.version
        versions.promotions[str(record.version)] = {
            **comparison, "promote": record.promote, "promoted": promoted, "reason": reason}

    try:
        _change(services, record.id, decide)
    except NotFound:
        return  # deleted meanwhile
    except ServiceUnavailable as error:  # the version stays ready; an alias PUT can promote it
        log.warning("classifier %s: version %d not promoted: %s", record.id, record.version,
                    error.detail)
        return
    log.info("classifier %s: version %d promotion settled", record.id, record.version)


def _change_returning_state(services: Services, classifier_id: str,
                            change: Callable[[ClassifierVersions], None]) -> ClassifierVersions:
    def changed(versions: ClassifierVersions) -> ClassifierVersions:
        change(versions)
        return versions

    return _change(services, classifier_id, changed)
