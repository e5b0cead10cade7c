"""`python -m app`: the service, as `pneumonia-serve` runs it (the container's command)."""

from app.main import run

run()
