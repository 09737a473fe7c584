"""macvlan-router: lets a Docker host reach its own containers on macvlan networks."""

__version__ = "0.1.0"
