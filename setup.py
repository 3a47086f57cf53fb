"""The one packaging step pyproject.toml cannot declare: a built wheel carries ``triton_repo/``
as ``trt_twotower/triton_repo``, so an installed trt-twotower finds its Triton model templates.

In a checkout the templates stay at the repository root (``triton_repo/``), where an editable
install reads them; the serve code looks inside the package first, then beside it."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

TRITON_REPO = Path(__file__).resolve().parent / "triton_repo"


class BuildPyWithTritonRepo(build_py):
    """build_py, plus a fresh copy of triton_repo/ into the built package (a stale copy from an
    earlier build is replaced, so a template removed from the checkout leaves the wheel too)."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib) / "trt_twotower" / "triton_repo"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(TRITON_REPO, target,
                        ignore=shutil.ignore_patterns("__pycache__", "*.py[co]"))


setup(cmdclass={"build_py": BuildPyWithTritonRepo})
