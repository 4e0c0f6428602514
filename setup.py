"""Only the package list, which pyproject.toml cannot express: every `shipkit*` package found on
disk plus `shipkit.templates`, whose folder (templates/, see [tool.setuptools.package-dir] in
pyproject.toml) lies outside `shipkit/`, so discovery alone never finds it."""

from setuptools import find_namespace_packages, setup

setup(packages=[*find_namespace_packages(include=["shipkit*"]), "shipkit.templates"])
