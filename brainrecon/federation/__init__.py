"""BrainGuard across real sites: Flower (``flwr`` >= 1.42) server and site apps, and their processes.

This is the same protocol as the in-process engine
(:func:`brainrecon.decoders.brainguard.federated.run_federation`; the protocol code — what a
site keeps, sends and fuses — is shared, in :mod:`brainrecon.decoders.brainguard.federated`),
split where the privacy boundary is:

``records``    what crosses the wire (a site's shared tensors and its sample count) and the
               check that refuses anything else;
``server``     the strategy (FedAvg of the shared tensors, weighted by the sample counts), the
               ServerApp's body, and :func:`~.server.serve` (``brainrecon federate server``);
``site``       one subject's site: its state between rounds, the ClientApp's train handler,
               its run after the last round, and :func:`~.site.run_site`
               (``brainrecon federate site``);
``app``        the ServerApp and ClientApp Flower loads (``brainrecon.federation.app:server_app``);
``bundle``     the Flower app (FAB) the server ships and the check that an app is it;
``link``       Flower's SuperLink with its Control and Runtime APIs answering loopback only;
``node``       Flower's SuperNode refusing every app but brainrecon's BrainGuard app (by content hash);
``worker``     the site worker ``federate site`` starts: it keeps the site in memory between
               Flower's per-message ClientApp processes;
``channel``    the owner-only local socket (and token) between a ClientApp and its site worker;
``supervise``  starting and stopping the processes, finding the ones a crash left, one lock
               per server or site directory;
``loopback``   :func:`~.loopback.fit_on_flower`, the whole federation on one machine
               (``brainrecon fit --engine flower``).

Flower runs with its deployment runtime (a SuperLink, one SuperNode per site, real processes;
no Ray). Telemetry is off unless ``FLWR_TELEMETRY_ENABLED`` is set by the user.

Closed by default: nothing listens or connects beyond loopback without TLS and SuperNode
authentication (or an explicit ``--insecure``). Sites that drop out: the server samples every
connected site each round and needs ``min_sites`` of them, one per subject; a round with fewer
replies is redone (from the last global model) once the site is back, for up to
``--round-timeout``, and then fails the federation rather than averaging a different
population than the local engine would. A site that crashes is restarted alone with the same
``--state-dir``: it resumes from its last completed round; a server restarted with
``--resume`` continues from its saved global model. A
directory holds one server or site at a time (a lock), and a restarted one first stops the
Flower processes its crashed predecessor left running (found by their ``FLWR_HOME``).
Importing this package does not import Flower; :mod:`.app` does.
"""

from brainrecon.extras import lazy_exports

# Imported when first used (PEP 562): a site's ClientApp process imports this package and
# must not pay for torch, which the server, the loop-back runner and the site's training need.
_EXPORTS = {
    "check_upload": "brainrecon.federation.records",
    "fit_on_flower": "brainrecon.federation.loopback",
    "flower_env": "brainrecon.federation.supervise",
    "flower_processes": "brainrecon.federation.supervise",
    "make_strategy": "brainrecon.federation.server",
    "run_site": "brainrecon.federation.site",
    "serve": "brainrecon.federation.server",
    "site_train": "brainrecon.federation.site",
    "stop_flower_processes": "brainrecon.federation.supervise",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = ["check_upload", "fit_on_flower", "flower_env", "flower_processes", "make_strategy", "run_site",
           "serve", "site_train", "stop_flower_processes"]
