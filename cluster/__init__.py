"""ike-cluster: an IKEv2 responder cluster on Trio."""

__version__ = "0.1.0"
