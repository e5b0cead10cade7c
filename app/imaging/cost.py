"""How much memory decoding an upload will hold at its peak, from what its header says.

The decode budget (`app.serving.admission.DecodeBudget`) reserves this before the pixels are
decompressed, so that concurrent decodes of large images cannot together exhaust the container.
The figures were measured with /proc VmHWM on 50-megapixel images (docs/PERFORMANCE.md).
"""

from __future__ import annotations

# Peak bytes per decoded pixel while an image of a mode is decoded and brought to 8-bit grey
# (`preprocessing.to_8bit`): the decoded image plus the grey copy made from it (CMYK goes through
# RGB inside Pillow; 16-bit adds the stretch's float64 slices).
_PEAK_BYTES_PER_PIXEL = {
    "1": 2, "L": 1, "LA": 3, "P": 2, "RGB": 4, "RGBA": 5, "RGBX": 5, "CMYK": 9,
    "I;16": 4, "I;16L": 4, "I;16B": 4, "I;16N": 4,
}  # fmt: skip
_OTHER_MODES_PEAK = 12
# Buffers every decode holds whatever its size (libjpeg's, the resize's, the model input).
_DECODE_OVERHEAD_BYTES = 4 * 1024 * 1024
# DICOM (pydicom and the contract's rendering): an uncompressed file peaks near 6x its length
# (its pixels are in the upload: the parsed copy, the decoded array, the lookup and the 8-bit
# image); a compressed one is charged for the largest image the pixel limit admits (an RLE file
# of 49 megapixels peaked at 10 bytes per pixel).
_UNCOMPRESSED_DICOM_PEAK_PER_BYTE = 7
_DICOM_PEAK_BYTES_PER_PIXEL = 11


def raster_decode_bytes(width: int, height: int, mode: str) -> int:
    """Peak memory for decoding a JPEG/PNG of this decoded size and Pillow mode."""
    return _DECODE_OVERHEAD_BYTES + width * height * _PEAK_BYTES_PER_PIXEL.get(
        mode, _OTHER_MODES_PEAK
    )


def dicom_decode_bytes(upload_bytes: int, pixels_stored_as_is: bool, max_pixels: int) -> int:
    """Peak memory for decoding a DICOM upload: proportional to the upload when its pixels are
    native, else the worst case the pixel limit admits (a codestream's own size says little)."""
    if pixels_stored_as_is:
        return upload_bytes * _UNCOMPRESSED_DICOM_PEAK_PER_BYTE
    return max_pixels * _DICOM_PEAK_BYTES_PER_PIXEL
