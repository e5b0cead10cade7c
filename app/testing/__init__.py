"""What the tests and the tools in `scripts/` share to drive the real service: a server process
and synthetic DICOM X-rays. Nothing in the service imports this package."""
