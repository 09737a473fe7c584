"""Docker's networks as the daemon last read them, and what that view lets it delete.

Pure values. A view is replaced piece by piece, each piece only by a successful read of
it: the network list by a list call that answered, a network's endpoints by an inspect
of that network that answered. A read that failed leaves the last good piece in place,
marked stale. `protection()` turns every doubt into prefixes whose routes must stay.
"""

import ipaddress
from dataclasses import dataclass, field, replace
from typing import Mapping, Optional, Tuple

from . import desired as desired_state
from .model import Network, Problem, Protection

EVERYWHERE = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


@dataclass(frozen=True)
class Record:
    """One managed network: the last good read, and why the newest read failed (if it did)."""

    network: Network
    stale: str = ""
    problems: Tuple[Problem, ...] = ()
    inspected: bool = True   # False: known only from the list, endpoints never read


@dataclass(frozen=True)
class View:
    listing: Optional[object] = None          # docker_source.Listing; None: never listed
    records: Mapping[str, Record] = field(default_factory=dict)
    selection_problems: Tuple[Problem, ...] = ()

    @property
    def listed(self):
        return self.listing is not None

    @property
    def answered(self):
        """Every read answered: the list, and an inspect of each managed network."""
        return self.listed and all(r.inspected and not r.stale for r in self.records.values())

    @property
    def complete(self):
        """Answered, and every record readable: enough to judge the configuration."""
        return self.answered and not self.listing.unreadable

    def after_list(self, listing, selectors):
        """The view after a list call that answered: managed networks re-selected; the ones
        Docker no longer lists are dropped, new ones wait for their first inspect."""
        chosen, problems = desired_state.select_networks(selectors, listing.networks,
                                                         listing.engine)
        records = {n.id: self.records.get(n.id)
                   or Record(n, stale="not read yet", inspected=False) for n in chosen}
        return replace(self, listing=listing, records=records,
                       selection_problems=tuple(problems))

    def after_inspect(self, network_id, network, problems=()):
        """The view after an inspect that answered; `network` None: Docker removed it."""
        records = dict(self.records)
        if network is None:
            records.pop(network_id, None)
        elif network_id in records:
            records[network_id] = Record(network, problems=tuple(problems))
        return replace(self, records=records)

    def after_failed_inspect(self, network_id, reason):
        records = dict(self.records)
        if network_id in records:
            records[network_id] = replace(records[network_id], stale=reason)
        return replace(self, records=records)

    def networks(self):
        """The managed networks as last read (stale ones with their last endpoints)."""
        return sorted((r.network for r in self.records.values()),
                      key=lambda n: (n.name, n.id))

    def stale(self):
        return {r.network.name: r.stale for r in self.records.values() if r.stale}

    def problems(self):
        listing = self.listing.problems if self.listed else ()
        records = tuple(p for r in self.records.values() for p in r.problems)
        stale = tuple(Problem(
            f"network {name}: reading it from Docker failed ({why}); its routes stay as "
            "they are until a read succeeds", name, kind="warning")
            for name, why in sorted(self.stale().items()) if why != "not read yet")
        return tuple(self.selection_problems) + tuple(listing) + records + stale

    def protection(self):
        """Routes that must stay whatever the plan thinks: everything before the first
        list or while a listed record is unreadable (it could be any network); else the
        subnets of networks read stale or with bad fields."""
        if not self.listed:
            return Protection(EVERYWHERE, "Docker's networks have not been read yet")
        if self.listing.unreadable:
            return Protection(EVERYWHERE, "Docker listed a network record that cannot be read")
        doubtful = {r.network.name for r in self.records.values() if r.stale or r.problems}
        doubtful |= {p.network for p in self.listing.problems if p.network}
        prefixes = tuple(subnet for n in self.listing.networks + tuple(self.networks())
                         if n.name in doubtful for subnet in n.subnets)
        why = f"network(s) {', '.join(sorted(doubtful))} not read completely" if doubtful else ""
        return Protection(tuple(dict.fromkeys(prefixes)), why)
