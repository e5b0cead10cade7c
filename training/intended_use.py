"""What a model trained here is for: written into its metadata as the contract's `intended_use`.

The service checks DICOM headers against it before decoding pixels. The population is the data
set's (Kermany et al. 2018: paediatric patients aged one to five, one centre in Guangzhou), not a
claim about where the model works.
"""

from __future__ import annotations

from app.contract import IntendedUse, Population

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE_STORAGE_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"

PAEDIATRIC_CHEST_XRAY = IntendedUse(
    summary="Frontal (PA/AP) chest radiographs, CR or DX, of children aged 1 to 5 years, for "
    "research use only: not a medical device.",
    modalities=["CR", "DX"],
    # DX "for processing" (raw detector data) is left out: it is not meant to be looked at, and the
    # model never saw such images.
    sop_class_uids={
        CR_IMAGE_STORAGE: "Computed Radiography Image Storage",
        DX_IMAGE_STORAGE_FOR_PRESENTATION: "Digital X-Ray Image Storage - For Presentation",
    },
    body_parts=["CHEST", "THORAX", "LUNG"],
    refused_view_positions=["LL", "RL", "LATERAL", "LAT"],
    training_population=Population(
        description="children aged 1 to 5 years, Guangzhou Women and Children's Medical Center",
        age_years_min=1.0,
        age_years_max=6.0,
    ),
)
