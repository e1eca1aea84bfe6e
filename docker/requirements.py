"""Image build step: the pinned dependency list of pyproject.toml plus one extra, for pip.

    python docker/requirements.py pyproject.toml cpu > requirements.txt

So the dependency layer is built from pyproject.toml alone and is reused until it changes.
"""

import sys
import tomllib


def main(pyproject: str, extra: str) -> int:
    with open(pyproject, "rb") as file:
        project = tomllib.load(file)["project"]
    print("\n".join([*project["dependencies"], *project["optional-dependencies"][extra]]))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
