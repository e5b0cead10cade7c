"""Render `models/figures/cam_examples.png`: test X-rays beside the class activation maps that
the service returns for them (`POST /predict?explain=true`), for the README and the model card.

    .venv/bin/python -m scripts.dev.explain_figure --data-dir ../shared/data/chest_xray

It runs the real service in-process on the shipped model, one NORMAL and two PNEUMONIA images of
the official test split (the first of each class in file order), and lays out the returned
pictures with the answer under each.
"""

from __future__ import annotations

import argparse
import base64
import io
from pathlib import Path

from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from app.main import create_app
from app.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]

CAPTION = 40


def _picture(encoded: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "chest_xray"
    )
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "models" / "figures" / "cam_examples.png"
    )
    args = parser.parse_args(argv)
    chosen = [
        sorted((args.data_dir / "test" / "NORMAL").glob("*.jpeg"))[0],
        *sorted((args.data_dir / "test" / "PNEUMONIA").glob("*.jpeg"))[:2],
    ]
    tiles = []
    with TestClient(create_app(Settings(provider="cpu"))) as client:
        for path in chosen:
            response = client.post(
                "/predict?explain=true&explain_class=PNEUMONIA",
                content=path.read_bytes(),
                headers={"content-type": "image/jpeg"},
            )
            response.raise_for_status()
            body = response.json()
            explanation = body["explanation"]
            pair = Image.new("RGB", (448, 224 + CAPTION), "white")
            pair.paste(_picture(explanation["image_png"]), (0, 0))
            pair.paste(_picture(explanation["overlay_png"]), (224, 0))
            text = (
                f"truth {path.parent.name}; answer {body['label']}, "
                f"p(PNEUMONIA) {body['probabilities']['PNEUMONIA']:.3f}\n"
                f"right: CAM of PNEUMONIA at opacity {explanation['opacity']}"
            )
            ImageDraw.Draw(pair).multiline_text((6, 226), text, fill="black")
            tiles.append(pair)
    sheet = Image.new("RGB", (448 * len(tiles) + 10 * (len(tiles) - 1), 224 + CAPTION), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (i * 458, 0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
