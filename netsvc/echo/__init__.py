"""Echo (RFC 862): every byte or datagram received goes back to its sender."""
