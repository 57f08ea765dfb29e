"""One package per project; each composes the shared core (models, transport,
sampling, train, data, eval) into that project's pipeline:
``reglue`` (REGLUE and its baselines), ``glod`` (global-local composition at
sampling time), ``lainr`` (locality-aware generalizable INR)."""
