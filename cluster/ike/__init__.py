"""Sans-IO IKEv2 (RFC 7296): no trio, no sockets, no clock reads."""
