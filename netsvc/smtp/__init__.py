"""SMTP relay: ESMTP server (protocol), durable queue, capture store, delivery."""
