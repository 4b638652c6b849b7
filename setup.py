"""Build step: the repository's ``conf/`` ships inside the package as ``defectscope/conf``.

``conf/`` stays the one source of the Hydra configs; mapping it to the ``defectscope.conf`` package
puts every group folder and its YAML files into the wheel, so `defectscope train` works from a
plain ``pip install`` (see ``defectscope.training.app.conf_dir``).  Everything else is in
pyproject.toml.
"""

from pathlib import Path

from setuptools import find_packages, setup

CONF = Path(__file__).parent / "conf"
CONF_PACKAGES = ["defectscope.conf"] + [
    ".".join(("defectscope.conf", *d.relative_to(CONF).parts)) for d in sorted(CONF.rglob("*")) if d.is_dir()
]

setup(
    package_dir={"": "inspect", "defectscope.conf": "conf"},
    packages=find_packages("inspect", include=["defectscope", "defectscope.*"]) + CONF_PACKAGES,
    package_data={name: ["*.yaml"] for name in CONF_PACKAGES},
)
