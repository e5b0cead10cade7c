"""DICOM networking: result objects (SR, heat-map Secondary Capture) and their durable delivery to
PACS, and the intakes hospitals push images with (STOW-RS, C-STORE) with their spool."""
