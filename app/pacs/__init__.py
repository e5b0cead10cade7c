"""DICOM networking: result objects, delivery, intake."""
