"""``python -m fullrange`` (and ``accelerate launch -m fullrange train ...``)."""

from .cli import app

app()
