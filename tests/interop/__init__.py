"""Tests against real programs nobody here wrote (socat, openssl, ...), and the helpers they share."""
