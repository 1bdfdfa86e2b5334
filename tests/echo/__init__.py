"""Echo service tests."""
