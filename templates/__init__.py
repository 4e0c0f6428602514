"""shipkit's model-card templates (`*.md.j2`), installed as the package `shipkit.templates`.

pyproject.toml and setup.py map this folder onto that package. This file makes it a regular
package, which an editable install can map from outside shipkit/, so that
`importlib.resources.files("shipkit.templates")` works there as in a wheel. The cards are
rendered by shipkit.card, which also reads a user's `--templates` folder first.
"""
