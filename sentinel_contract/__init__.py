"""The contract between the trainer (``sentinel``) and the sidecar agent (``agent``): what both must agree on.

Both processes import this package and neither imports the other (docs/architecture.md):

- ``protocol``: the statistics wire format (trainer -> agent);
- ``commands``: the command wire format (agent -> trainer), validated against ``actions``;
- ``actions``: the one table of command actions (arguments, strength, whether corrective), from
  which the agent's policy and the trainer's control loop take their behaviour;
- ``typedconfig``: the typed-configuration machinery both configurations are built with;
- ``channels``: the endpoint syntax, the loopback test, the CURVE sections and the discovery file's
  name and place, so that the side that binds and the side that connects read them alike;
- ``agent_process``: the agent's process interface (its command line and ready file), for whoever
  starts an agent: ``sentinel demo``, the tests, the benchmarks.

Why a top-level package rather than a subpackage of one side: importing ``sentinel.x`` runs
``sentinel/__init__``, which loads torch, and the agent must never load torch; importing
``agent.x`` from the trainer would pull the sidecar's policy, predictors and history into the
training process.  A package beside both, that imports neither and needs only the standard library,
numpy, pyzmq and PyYAML, is the floor both stand on.  Its name says whose contract it is.
"""
