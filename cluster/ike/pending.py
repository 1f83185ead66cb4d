"""Exchanges that wait for something only the runtime can get (sans-IO).

An exchange that needs an address from the cluster's store, or a CRL from a URI, raises
a `Pending`; the session parks the request, the actor awaits `fetch()` and calls
`resume`, and the exchange runs again from the start with what was fetched.
"""

from __future__ import annotations


class Pending(Exception):
    async def fetch(self) -> None:
        """Get what the exchange waits for (awaited by the actor, never by the core)."""
        raise NotImplementedError
