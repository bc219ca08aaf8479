"""rmilter's test suite (trial).

Hypothesis profiles: ``dev`` (default) explores new random examples on every run; ``ci``
(``HYPOTHESIS_PROFILE=ci``, set by .ci/run) derandomizes, so a CI run is reproducible.  Neither
has a per-example deadline: a loaded 2-core machine must not turn slowness into failures.
"""
import os

from hypothesis import HealthCheck, settings

settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", parent=settings.get_profile("dev"), derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
