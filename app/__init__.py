"""Pneumonia screening inference service (research use only, not a diagnostic device)."""
