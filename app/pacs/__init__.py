"""Result objects for PACS (DICOM SR and heat-map Secondary Capture) and their durable delivery."""
