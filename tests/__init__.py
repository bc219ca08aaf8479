"""rmilter's test suite (trial).

Hypothesis profiles: ``dev`` (default) explores new random examples on every run; ``ci``
(``HYPOTHESIS_PROFILE=ci``, set by .ci/run) derandomizes, so a CI run is reproducible.  Neither
has a per-example deadline: a loaded 2-core machine must not turn slowness into failures.

``HYPOTHESIS_SEED=N`` runs the property tests with that seed (the ``dev`` profile), so a run that
found something can be repeated, and a release can be checked under a list of seeds::

    for seed in $(seq 1 20); do HYPOTHESIS_SEED=$seed python3 -m twisted.trial tests; done
"""
import os

import hypothesis.core
from hypothesis import HealthCheck, settings

settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", parent=settings.get_profile("dev"), derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

if os.environ.get("HYPOTHESIS_SEED"):
    # what hypothesis's own pytest plugin sets for --hypothesis-seed; trial has no such option
    hypothesis.core.global_force_seed = int(os.environ["HYPOTHESIS_SEED"])
