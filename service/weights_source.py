"""Turns `HEADSTART_BACKBONE_WEIGHTS` into something `models.backbone.load_backbone` takes:
"imagenet", "random" or a local file. An `s3://bucket/key` is downloaded into the weights cache
first (through `service.s3`; boto3 never reaches models/); the fingerprint check happens when
the file loads."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
from pathlib import Path

from service.s3 import s3_client
from service.settings import Settings

log = logging.getLogger(__name__)


def local_weights(settings: Settings) -> str:
    """The weights setting with any s3:// URI replaced by a downloaded local copy."""
    spec = settings.backbone_weights
    if not spec.startswith("s3://"):
        return spec
    bucket, _, key = spec[len("s3://"):].partition("/")
    if not bucket or not key:
        raise ValueError(f"HEADSTART_BACKBONE_WEIGHTS must be s3://bucket/key. Received: {spec}")
    suffix = ".weights.h5" if key.endswith(".weights.h5") else ".h5"
    target = Path(settings.weights_cache) / (
        "s3-" + hashlib.sha256(spec.encode()).hexdigest()[:16] + suffix)
    if target.is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading backbone weights from %s", spec)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        s3_client(settings).download_file(bucket, key, temp)
        os.replace(temp, target)
    finally:
        Path(temp).unlink(missing_ok=True)
    return str(target)


def main() -> int:
    """`python -m service.weights_source`: obtain and check the weights before the server starts,
    so a missing file or an unreachable source stops `make run` with a clear message."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings()
    from models import weights

    try:
        spec = local_weights(settings)
        if spec == "random":
            log.warning("HEADSTART_BACKBONE_WEIGHTS=random: development only, predictions are "
                        "meaningless")
        elif spec == "imagenet":
            path, source = weights.resolve_imagenet(Path(settings.weights_cache))
            log.info("ImageNet weights ready: %s (from %s)", path, source)
        else:
            weights.verify_file(spec)
            log.info("weights file %s matches the ImageNet fingerprint", spec)
    except Exception as error:  # a message for a person at a terminal, not a traceback
        print(f"\nHeadstart cannot start: {error}\n", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
