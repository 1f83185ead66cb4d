"""Fuzzing a whole responder node over loopback UDP (issue 4: a hostile network)."""
