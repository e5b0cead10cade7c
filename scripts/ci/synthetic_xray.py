"""A synthetic full-resolution chest film, 2000x2400 grayscale JPEG, written to stdout.

Real chest films are 1-3k px a side; the local data set is 224 px. scripts/ci/docker-smoke.sh runs
this inside the service image (mounted read-only, no network), with the image's own Pillow, so
the host needs no imaging library:

    docker run --rm --network none --read-only --entrypoint python \
        -v "$PWD/scripts/ci/synthetic_xray.py:/tmp/synthetic_xray.py:ro" \
        IMAGE /tmp/synthetic_xray.py
"""

from __future__ import annotations

import io
import sys

from PIL import Image, ImageDraw, ImageFilter


def synthetic_xray(w: int = 2000, h: int = 2400) -> bytes:
    """Two lung fields and a spine, blurred, with some noise: JPEG quality 92."""
    im = Image.new("L", (w, h), 25)
    d = ImageDraw.Draw(im)
    d.ellipse((300, 350, 950, 2050), fill=95)
    d.ellipse((1050, 350, 1700, 2050), fill=105)
    d.rectangle((930, 150, 1070, 2300), fill=200)
    im = Image.blend(im.filter(ImageFilter.GaussianBlur(30)), Image.effect_noise((w, h), 40), 0.15)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92)
    return buf.getvalue()


if __name__ == "__main__":
    sys.stdout.buffer.write(synthetic_xray())
