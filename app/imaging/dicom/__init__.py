"""DICOM Part-10 upload -> the 8-bit grey image the model contract prescribes, or a refusal.

Three stages, each refusing what it cannot vouch for, one module per skill:

1. Parse the header (`read`). A deflated data set is inflated with a ceiling on its size
   (pydicom's own reader would inflate a 32 MiB upload into gigabytes).
2. Gate on the header alone, before any pixel is decoded (`gate`): the model's intended use
   (`IntendedUse` in the contract: modality, SOP class, body part, view position, age), one frame
   of one grey sample, integer pixels, and the same pixel-count and side limits as JPEG/PNG. The
   compressed frame's own dimensions must agree with Rows/Columns (`codestream`), so a codestream
   cannot allocate more than the header admitted.
3. Decode the pixels (`decode`: pydicom with the pylibjpeg plugins; a large JPEG 2000 frame at the
   reduced resolution level of the contract's `Jpeg2000Reduction`, with Pillow's OpenJPEG; a
   lossless JPEG, JPEG-LS or JPEG 2000 frame with imagecodecs, `app.imaging.lossless`) and render
   them with the contract's `DicomRendering` (`display`): modality LUT, VOI, polarity, 8 bits.

Patient data: nothing read from the header is logged or put into an error message except coded,
non-identifying attributes that explain a refusal (Modality, SOP class, Body Part Examined, View
Position, Photometric Interpretation, bit depths), and those only after sanitising (`values`).
The response echoes the three instance UIDs, modality, view position and the applied window,
nothing else. The training side renders independently (`training.dicom`); a test proves the two
agree.
"""

from app.imaging.dicom.codestream import J2kMainHeader as J2kMainHeader
from app.imaging.dicom.codestream import j2k_main_header as j2k_main_header
from app.imaging.dicom.decode import OpenedDicom as OpenedDicom
from app.imaging.dicom.decode import RenderedDicom as RenderedDicom
from app.imaging.dicom.decode import open_dicom as open_dicom
from app.imaging.dicom.decode import use_codec_threads as use_codec_threads
from app.imaging.dicom.display import render_dicom as render_dicom
from app.imaging.dicom.gate import intended_use_refusal as intended_use_refusal
from app.imaging.dicom.read import DECODABLE_TRANSFER_SYNTAXES as DECODABLE_TRANSFER_SYNTAXES
from app.imaging.dicom.read import MEDIA_STORAGE_DIRECTORY as MEDIA_STORAGE_DIRECTORY
from app.imaging.dicom.read import DicomPolicy as DicomPolicy
from app.imaging.dicom.read import read_part10 as read_part10
from app.imaging.dicom.values import patient_age_years as patient_age_years
from app.imaging.types import AppliedWindow as AppliedWindow
from app.imaging.types import DicomFindings as DicomFindings
