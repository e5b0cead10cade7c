"""What the tests share: tiny models and settings, real-process servers, DICOM test files, the
offline browser, and where the real data is."""
