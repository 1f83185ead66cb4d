"""The responder's Trio runtime: sockets -> supervisor -> one actor per IKE SA.

`run_node(config)` runs a single node; the pieces are usable on their own for
tests and for the cluster roles that arrive later.
"""
