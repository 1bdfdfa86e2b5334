"""Chat service tests."""
