"""Packaging for rmilter: ``pip install .`` makes ``twistd rmilter`` and ``rmilter check-config`` work.

Python 3.11 is the floor (Debian 12's python3) and the version the suite runs on in CI; the code
uses 3.10+ features (``dataclass(slots=True)``).  Build files go to a temporary directory, so
``pip install .`` leaves the checkout as it was (no ``build/`` or ``*.egg-info``).
"""
import atexit
import shutil
import tempfile

from setuptools import find_packages, setup

_BUILD_DIR = tempfile.mkdtemp(prefix="rmilter-build.")
atexit.register(shutil.rmtree, _BUILD_DIR, True)

setup(
    name="rmilter",
    version="3.0.0.dev0",
    description="Milter for Postfix/Sendmail: Rspamd, ClamAV, Redis greylisting and rate limits, DKIM (Twisted)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="BSD-2-Clause",
    python_requires=">=3.11",
    packages=find_packages(include=["rmilter", "rmilter.*"]) + ["twisted.plugins"],
    package_data={"twisted.plugins": ["rmilter_plugin.py", "rmilter_endpoints.py"]},
    install_requires=[
        "twisted>=22.10",
        # one private piece (RedisProtocol._build_command) is used: tested against 1.6 (tests.test_redis_role)
        "txredisapi>=1.6,<1.7",
        "dkimpy>=1.1",
        "treq>=22.1",
        "service-identity>=21.1",
        # TLS to https:// Rspamd servers (issue 12): Twisted's tls extra
        "pyopenssl>=22.0",
        "idna>=2.4",
        "cryptography>=3.1",
        "xxhash>=3.0",
        "hiredis>=2.0",
        "zstandard>=0.19",
        "prometheus_client>=0.16",
    ],
    # pynacl: dkimpy's Ed25519 verifier, the tests' second opinion on ed25519-sha256 signatures
    extras_require={"test": ["hypothesis>=6.0", "pynacl>=1.4"], "dev": ["hypothesis>=6.0", "pynacl>=1.4", "mypy"],
                    "fuzz": ["hypothesis>=6.0", "atheris>=2.3"]},
    entry_points={"console_scripts": ["rmilter=rmilter.cli:main"]},
    data_files=[
        ("share/rmilter", ["rmilter.conf.sample", "rmilter.tac"]),
        ("share/rmilter/systemd", ["systemd/rmilter.service", "systemd/rmilter.socket", "systemd/rmilter.tmpfiles"]),
    ],
    classifiers=[
        "Framework :: Twisted",
        "Topic :: Communications :: Email :: Filters",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
    ],
    options={"build": {"build_base": _BUILD_DIR}, "egg_info": {"egg_base": _BUILD_DIR}},
)
