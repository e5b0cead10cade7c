"""Upload bytes -> model input: format detection, decoding with limits, DICOM gating and rendering,
and the preprocessing contract. No model, no HTTP."""
